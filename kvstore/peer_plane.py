"""Block bytes served peer to peer over gRPC, for readers on other hosts.

Each store handle runs a small gRPC server (``BlockPeerServer``) that streams the bytes of
blocks in its host's shared memory or disk tier to any peer that asks, and frees them when
a peer's eviction says so. A payload in the index then names the host and server that hold
the bytes: ``b"<boot id>@<host:port>|<tier>|<local payload>"``. A reader on that host
(same advertised host name, same kernel boot) reads the segment or file directly, whichever
process wrote it; a reader elsewhere pulls it in 1 MiB chunks from the holder's server (Mooncake's
transfer engine, in its simplest form: TCP, no RDMA).

The wire carries raw block bytes and payload names, not pickles: a request is a payload,
a ``Read`` reply is a stream of byte chunks, a ``Discard`` request is payloads joined by
newlines.

A handle's blocks are reachable from other hosts while it is open: ``close`` takes them out
of the index first. A host that crashes leaves them indexed; readers elsewhere get
``KeyError`` (as for any missing block) and ``sweep_orphans`` on that host, once back,
frees the bytes.
"""

from __future__ import annotations

import functools
import logging
import pathlib
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from concurrent import futures

import grpc

from kvstore.data_planes import DataPlane

logger = logging.getLogger(__name__)

_SERVICE = "pdmesh.kv.v1.BlockPeer"
_READ = f"/{_SERVICE}/Read"
_DISCARD = f"/{_SERVICE}/Discard"
CHUNK_BYTES = 1 << 20
_MAX_MESSAGE_BYTES = 4 * CHUNK_BYTES
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
]


class BlockPeerServer:
    """Serves the bytes behind this host's local payloads of ``planes`` (tier -> plane)."""

    def __init__(self, planes: dict[str, DataPlane], bind_host: str, advertise_host: str) -> None:
        self._planes = planes
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="kv-peer"),
            options=_CHANNEL_OPTIONS,
        )
        handlers = {
            "Read": grpc.unary_stream_rpc_method_handler(self._read),
            "Discard": grpc.unary_unary_rpc_method_handler(self._discard),
        }
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(_SERVICE, handlers),)
        )
        port = self._server.add_insecure_port(f"{bind_host}:0")
        self._server.start()
        self.address = f"{advertise_host}:{port}"

    def stop(self) -> None:
        self._server.stop(grace=None)

    def _read(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        tier, _, payload = request.partition(b"|")
        plane = self._planes.get(tier.decode())
        if plane is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"no tier {tier!r} here")
            return
        try:
            data = plane.read(payload)
        except KeyError as error:
            context.abort(grpc.StatusCode.NOT_FOUND, str(error))
        view = memoryview(data)
        for start in range(0, len(view), CHUNK_BYTES):
            yield bytes(view[start : start + CHUNK_BYTES])
        if not view:
            yield b""

    def _discard(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        by_tier: dict[str, list[bytes]] = defaultdict(list)
        for line in request.split(b"\n"):
            tier, _, payload = line.partition(b"|")
            by_tier[tier.decode()].append(payload)
        for tier_name, payloads in by_tier.items():
            if tier_name in self._planes:
                self._planes[tier_name].discard(payloads)
        return b""


class PeerPlane(DataPlane):
    """A local plane (shared memory, or the disk tier's files) whose bytes peers on other
    hosts reach through ``server``."""

    holds_external_data = True

    def __init__(self, local: DataPlane, tier: str, server: BlockPeerServer) -> None:
        self._local = local
        self._tier = tier.encode()
        self._server = server
        self._boot_id = _boot_id()
        self._host = server.address.rpartition(":")[0].encode()
        self._address = self._boot_id + b"@" + server.address.encode()
        self._channels: dict[bytes, grpc.Channel] = {}
        self._channels_lock = threading.Lock()
        #: Bytes this plane pulled from peers (for the store's per-path counters).
        self.bytes_from_peers = 0

    @property
    def address_prefix(self) -> bytes:
        """How every payload this plane's server serves begins."""
        return self._address + b"|"

    def write(self, block_hash_hex: str, data: bytes) -> bytes:
        return b"|".join((self._address, self._tier, self._local.write(block_hash_hex, data)))

    def read(self, payload: bytes) -> bytes:
        address, tier, local_payload = _split(payload)
        if self._is_local(address):
            return self._local.read(local_payload)
        try:
            chunks = self._channel(address).unary_stream(_READ)(tier + b"|" + local_payload)
            data = b"".join(chunks)
        except grpc.RpcError as error:
            raise KeyError(
                f"block bytes on peer {address.decode()} are unreachable or gone: {error}"
            ) from None
        self.bytes_from_peers += len(data)
        return data

    def discard(self, payloads: Iterable[bytes]) -> None:
        by_peer: dict[bytes, list[bytes]] = defaultdict(list)
        for payload in payloads:
            address, tier, local_payload = _split(payload)
            if self._is_local(address):
                self._local.discard([local_payload])
            else:
                by_peer[address].append(tier + b"|" + local_payload)
        for address, remote in by_peer.items():
            try:
                self._channel(address).unary_unary(_DISCARD)(b"\n".join(remote), timeout=10)
            except grpc.RpcError as error:  # the peer's host is gone, and its bytes with it
                logger.warning(
                    "could not free %d blocks on peer %s: %s", len(remote), address, error
                )

    def stored_names(self) -> dict[str, float]:
        return self._local.stored_names()

    def discard_stored(self, names: Iterable[str]) -> None:
        self._local.discard_stored(names)

    def payload_name(self, payload: bytes) -> str:
        address, _, local_payload = _split(payload)
        return self._local.payload_name(local_payload) if self._is_local(address) else ""

    def close(self) -> None:
        with self._channels_lock:
            for channel in self._channels.values():
                channel.close()
            self._channels.clear()

    def _is_local(self, address: bytes) -> bool:
        """Whether ``address``'s bytes are on this host: its segments and files are ours
        to open, whichever process's server serves them."""
        boot_id, _, host_port = address.partition(b"@")
        return boot_id == self._boot_id and host_port.rpartition(b":")[0] == self._host

    def _channel(self, address: bytes) -> grpc.Channel:
        with self._channels_lock:
            channel = self._channels.get(address)
            if channel is None:
                target = address.partition(b"@")[2].decode()
                channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
                self._channels[address] = channel
            return channel


@functools.cache
def _boot_id() -> bytes:
    """This kernel boot's id: two hosts (or one host rebooted, its /dev/shm gone) differ."""
    try:
        return pathlib.Path("/proc/sys/kernel/random/boot_id").read_bytes().strip()
    except OSError:
        return uuid.uuid4().hex.encode()  # unknown: nothing counts as local but this process


def _split(payload: bytes) -> tuple[bytes, bytes, bytes]:
    address, _, rest = payload.partition(b"|")
    tier, _, local_payload = rest.partition(b"|")
    return address, tier, local_payload
