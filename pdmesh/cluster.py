"""``pdmesh up``: one process per service on this host, started and stopped in order.

Each worker and the gateway run ``python -m pdmesh.services`` (each worker's engine core is a
process of its own below it), so no two services share a GIL and none shares one with a load
generator. The embedded store becomes a private redis-server index with block bytes in host
shared memory: no external server. Stopping drains the gateway first (running requests
finish), then the workers, then the store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from engine.config import EngineConfig
from kvstore.local_redis import start_redis, stop_redis
from pdmesh.mesh import MeshConfig, service_metrics_port, warn_shared_devices
from pdmesh.services import (
    CHILD_COMMAND,
    HTTP_LISTENING,
    LISTENING,
    ServiceSpec,
    describe_gateway,
    describe_workers,
)
from serving.security import SecurityConfig

logger = logging.getLogger(__name__)

#: Model loading (and CUDA graph capture) of the slowest worker.
START_TIMEOUT_S = 900.0


class ServiceExited(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    role: str
    process: subprocess.Popen[bytes]
    address: str = ""
    #: A gateway's OpenAI HTTP port, once it reported it.
    http_port: int | None = None

    def wait_listening(self, deadline: float) -> str:
        """Reads the child's output until it says where it listens (it serves from then)."""
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode(errors="replace")
            if not line:
                code = self.process.wait()
                raise ServiceExited(f"{self.name} exited ({code}) before serving")
            if LISTENING in line:
                self.address = line.rsplit(LISTENING, 1)[1].strip()
                self._relay()
                return self.address
            if HTTP_LISTENING in line:
                self.http_port = int(line.rsplit(":", 1)[1].split("/", 1)[0])
            sys.stdout.write(f"[{self.name}] {line}")
        raise ServiceExited(f"{self.name} did not serve in {START_TIMEOUT_S:.0f} s")

    def _relay(self) -> None:
        """Forwards the rest of the child's output (its logs go to stderr, shared)."""

        def copy() -> None:
            assert self.process.stdout is not None
            for raw in self.process.stdout:
                sys.stdout.write(f"[{self.name}] {raw.decode(errors='replace')}")
                sys.stdout.flush()

        threading.Thread(target=copy, daemon=True).start()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def join(self, timeout_s: float) -> None:
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
            self.process.kill()
            self.process.wait()
        if self.process.stdin is not None:
            self.process.stdin.close()


class LocalCluster:
    """The services of ``config`` as processes of this host; ``start`` returns when the
    gateway serves, ``stop`` drains and stops them all."""

    def __init__(self, config: MeshConfig, log_format: str = "text") -> None:
        self.config = config
        self.security: SecurityConfig = config.security.with_mesh_secret()
        self.log_format = log_format
        self.store = config.store
        self._redis: subprocess.Popen[bytes] | None = None
        self.workers: list[Child] = []
        self.gateways = GatewayGroup(self._describe_gateway())

    @property
    def gateway(self) -> Child | None:
        """The first gateway process (the others serve the same ports)."""
        return self.gateways.children[0] if self.gateways.children else None

    @property
    def gateway_address(self) -> str:
        return self.gateways.address

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        config = self.config
        if config.store == "embedded":
            self._redis, url = start_redis()
            self.store = url.replace("redis://", "redis+shm://", 1)
        warn_shared_devices(config)
        tp = {"prefill": config.prefill_tp, "decode": config.decode_tp}
        counts: dict[str, int] = {}
        for index, (role, place) in enumerate(zip(config.roles, config.placements(), strict=True)):
            number = counts[role] = counts.get(role, -1) + 1
            spec = self._spec(
                role,
                place.engine(config.engine, tp.get(role, config.prefill_tp)),
                f"{config.worker_host}:{config.worker_port(index)}",
                service_metrics_port(config.metrics_port, 1 + index),
            )
            self.workers.append(self._launch(f"{role}-{number}", spec, place.env()))
        deadline = time.monotonic() + START_TIMEOUT_S
        for worker in self.workers:  # they load their models at the same time
            worker.wait_listening(deadline)
        gateway = dataclasses.replace(
            self._spec("gateway", config.engine, f"{config.host}:{config.gateway_port}", None),
            prefill=self._addresses("prefill"),
            decode=self._addresses("decode"),
            colocated=self._addresses("colocated"),
            http_port=config.http_port,
            served_model_name=config.served_model_name,
        )
        # Gateway 0 has the first metrics port, the workers the next ones, then the others.
        ports = [service_metrics_port(config.metrics_port, 0)] + [
            service_metrics_port(config.metrics_port, len(self.workers) + i)
            for i in range(1, config.gateway_processes)
        ]
        self.gateways.start(gateway, ports, deadline)

    def _addresses(self, role: str) -> tuple[str, ...]:
        return tuple(w.address for w in self.workers if w.role == role)

    def _spec(
        self, role: str, engine: EngineConfig, address: str, metrics: int | None
    ) -> ServiceSpec:
        return ServiceSpec(
            role=role,
            engine=engine,
            address=address,
            store=self.store,
            security=self.security,
            limits=self.config.limits,
            metrics_port=metrics,
            store_capacity_blocks=self.config.store_capacity_blocks,
            log_format=self.log_format,
        )

    def _launch(self, name: str, spec: ServiceSpec, env: dict[str, str]) -> Child:
        describe = describe_workers(self.security, self.config.security.mesh_secret is None)
        return launch_child(name, spec, describe, env)

    def _describe_gateway(self) -> str:
        return describe_gateway(self.security)

    def exited(self) -> Child | None:
        """A service that is no longer running, if any."""
        children = [*self.workers, *self.gateways.children]
        return next((c for c in children if c.process.poll() is not None), None)

    def stop(self) -> None:
        """Drains the gateways (their running requests finish), then stops the workers."""
        timeout = self.config.limits.drain_timeout_s + 30
        self.gateways.stop(timeout)
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.join(timeout)
        if self._redis is not None:
            stop_redis(self._redis)
            self._redis = None


def launch_child(name: str, spec: ServiceSpec, describe: str, env: dict[str, str]) -> Child:
    """``spec``'s service in a process of its own (``pdmesh.services.main``)."""
    process = subprocess.Popen(
        [sys.executable, *CHILD_COMMAND],
        stdin=subprocess.PIPE,  # the spec, then held open: its end stops the child
        stdout=subprocess.PIPE,
        env={**os.environ, **env},
        start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop them in order
    )
    assert process.stdin is not None
    process.stdin.write(pickle.dumps((spec, describe)))
    process.stdin.flush()
    return Child(name, spec.role, process)


class GatewayGroup:
    """One gateway, or several processes sharing its gRPC and HTTP ports (SO_REUSEPORT: the
    kernel spreads connections over them). One event loop streams about 20k tokens/s; more
    processes scale the gateway with the host's cores. Each admits ``max_in_flight`` and has a
    /metrics port of its own: the kernel places connections, not requests, so a share of the
    limit would refuse a busy connection's requests while its siblings sit idle (one client
    channel lands on one process)."""

    def __init__(self, describe: str) -> None:
        self.describe = describe
        self.children: list[Child] = []
        #: The private sockets the processes ask each other for Aborts on (mode 0700).
        self._peer_dir: str | None = None

    @property
    def address(self) -> str:
        assert self.children, "not started"
        return self.children[0].address

    def start(self, spec: ServiceSpec, metrics_ports: list[int | None], deadline: float) -> None:
        """Starts ``len(metrics_ports)`` gateways; the first picks the ports (0: free ones),
        the others bind the same."""
        count = len(metrics_ports)
        spec = dataclasses.replace(spec, reuse_port=count > 1)
        peers = self._peer_addresses(count)
        first = self._launch(0, self._own(spec, 0, peers, metrics_ports))
        first.wait_listening(deadline)
        if count == 1:
            return
        host = spec.address.rsplit(":", 1)[0]
        port = first.address.rsplit(":", 1)[1]
        shared = dataclasses.replace(spec, address=f"{host}:{port}", http_port=first.http_port)
        for index in range(1, count):
            self._launch(index, self._own(shared, index, peers, metrics_ports))
        for child in self.children[1:]:
            child.wait_listening(deadline)

    def _peer_addresses(self, count: int) -> list[str]:
        if count == 1:
            return []
        self._peer_dir = tempfile.mkdtemp(prefix="pdmesh-gateways-")
        return [f"unix:{self._peer_dir}/gateway-{index}.sock" for index in range(count)]

    @staticmethod
    def _own(
        spec: ServiceSpec, index: int, peers: list[str], metrics_ports: list[int | None]
    ) -> ServiceSpec:
        """Gateway ``index``'s spec: its metrics port, its socket, its siblings'."""
        return dataclasses.replace(
            spec,
            metrics_port=metrics_ports[index],
            peer_address=peers[index] if peers else None,
            siblings=tuple(peers[:index] + peers[index + 1 :]),
        )

    def _launch(self, index: int, spec: ServiceSpec) -> Child:
        name = "gateway" if index == 0 else f"gateway-{index}"
        child = launch_child(name, spec, self.describe, {})
        self.children.append(child)
        return child

    def stop(self, timeout_s: float) -> None:
        for child in self.children:  # all drain at once
            child.terminate()
        for child in self.children:
            child.join(timeout_s)
        if self._peer_dir is not None:
            shutil.rmtree(self._peer_dir, ignore_errors=True)
            self._peer_dir = None
