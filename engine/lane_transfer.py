"""Hand-off blocks through the device lane (``kvstore.device_lane``): a prefill worker
publishes each chunk's blocks into its device arena; a decode worker of the same host copies
them device to device, and takes from the store whatever the lane no longer holds."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import torch

from engine.model_runner import ModelRunner
from kvstore.base import KVStore
from kvstore.block_hash import BlockHash
from kvstore.device_lane import DeviceArena, LaneIndex, LaneSlot
from kvstore.errors import StoreFullError

logger = logging.getLogger(__name__)

# Rows copied per device copy when filling (bounds the temporary buffer: 256 MiB for
# Llama-8B-sized 2 MiB blocks).
FILL_ROWS = 128
DEFAULT_LANE_MIB = 2048


class LaneTransfer:
    """One worker's side of the lane. ``num_rows`` > 0 gives it an arena to publish into
    (a prefill worker); every worker with a lane can read from it."""

    def __init__(
        self, index: LaneIndex, runner: ModelRunner, store: KVStore, num_rows: int = 0
    ) -> None:
        self.index = index
        self.runner = runner
        self.store = store
        self.arena = (
            DeviceArena(runner.bytes_per_stored_block, num_rows, runner.device)
            if num_rows
            else None
        )
        if self.arena is not None:
            index.register(self.arena)
        #: Blocks filled from the lane; blocks a reused row wrote to the store first.
        self.num_filled_blocks = 0
        self.num_demoted_blocks = 0

    def can_publish(self, num_blocks: int) -> bool:
        return self.arena is not None and 0 < num_blocks <= self.arena.num_rows

    @torch.inference_mode()
    def publish(self, block_ids: list[int], hashes: list[BlockHash]) -> None:
        """Copies the blocks into the arena's next rows and names them for readers."""
        arena = self.arena
        assert arena is not None and len(block_ids) == len(hashes)
        rows = arena.next_rows(len(block_ids))
        self._retire(rows)  # before the rows change
        data = self.runner.device_rows(block_ids)  # (num_blocks, block_bytes)
        arena.rows.index_copy_(0, self.runner.to_device(rows, torch.int64), data)
        self.runner.wait_device()  # readers on other streams and processes see whole rows
        slots = arena.fill(rows, hashes)
        self.index.publish(list(zip(hashes, slots, strict=True)))

    def _retire(self, rows: Sequence[int]) -> None:
        """The rows' blocks lose their names; a block no reader took goes to the store
        first, so a published block stays readable."""
        assert self.arena is not None
        old = self.arena.contents(rows)
        taken = self.index.forget_taken(old)
        untaken = [block for block, is_taken in zip(old, taken, strict=True) if not is_taken]
        self._demote(untaken)
        self.index.forget(untaken)

    def _demote(self, blocks: list[tuple[BlockHash, LaneSlot]]) -> None:
        """Writes the blocks the store lacks to it, unpinned."""
        arena = self.arena
        assert arena is not None
        demote = [(h, slot) for h, slot in blocks if self.store.locate(h) is None]
        if not demote:
            return
        index = torch.tensor([slot.row for _, slot in demote], device=arena.rows.device)
        host = arena.rows.index_select(0, index).cpu()
        owner = f"lane-{arena.arena_id}/demote"
        try:
            data = [(h, bytes(row.numpy())) for (h, _), row in zip(demote, host, strict=True)]
            self.store.put(owner, data)
            self.num_demoted_blocks += len(demote)
        except StoreFullError as error:
            logger.warning("lane: dropped %d untaken blocks: %s", len(demote), error)
        finally:
            self.store.release(owner)

    def reachable(self, hashes: list[BlockHash]) -> list[LaneSlot | None]:
        """Each block's slot where this process can map its arena, else None."""
        slots = self.index.lookup(hashes)
        arenas = {s.arena_id for s in slots if s is not None}
        mapped = {a for a in arenas if self.index.arena_rows(a) is not None}
        return [s if s is not None and s.arena_id in mapped else None for s in slots]

    @torch.inference_mode()
    def copy(self, block_ids: list[int], hashes: list[BlockHash]) -> list[tuple[int, LaneSlot]]:
        """Copies every named block the lane holds (and this process can map) into
        ``block_ids``; returns (position into ``hashes``, slot) of each copied block, to be
        ``confirm``ed once the device is done."""
        by_arena: dict[str, list[tuple[int, LaneSlot]]] = defaultdict(list)
        for position, slot in enumerate(self.index.lookup(hashes)):
            if slot is not None:
                by_arena[slot.arena_id].append((position, slot))
        copied: list[tuple[int, LaneSlot]] = []
        for arena_id, found in by_arena.items():
            rows = self.index.arena_rows(arena_id)
            if rows is None:  # another host's, or gone: the store has these
                logger.warning("lane: cannot map arena %s here; using the store", arena_id)
                continue
            for start in range(0, len(found), FILL_ROWS):
                piece = found[start : start + FILL_ROWS]
                data = self._copy_rows(rows, [slot.row for _, slot in piece])
                self.runner.write_rows([block_ids[i] for i, _ in piece], data)
            copied.extend(found)
        return copied

    def confirm(self, hashes: list[BlockHash], copied: list[tuple[int, LaneSlot]]) -> list[int]:
        """After the copies: the positions whose block changed slot meanwhile (its row may
        have been rewritten during the copy, or the block republished elsewhere); the others
        are whole, and taken."""
        if not copied:
            return []
        self.runner.wait_device()
        whole = self.index.confirm([(hashes[i], slot) for i, slot in copied])
        self.num_filled_blocks += sum(whole)
        return [i for (i, _), ok in zip(copied, whole, strict=True) if not ok]

    def _copy_rows(self, rows: torch.Tensor, wanted: list[int]) -> torch.Tensor:
        """The ``wanted`` rows on this worker's device, copied run by run: a ring publishes
        consecutive rows, so this is a few plain copies (peer copies on the copy engine when
        the arena is on another GPU; no kernel runs on the writer's GPU)."""
        data = torch.empty(
            (len(wanted), rows.shape[1]), dtype=torch.uint8, device=self.runner.device
        )  # (len(wanted), block_bytes)
        start = 0
        while start < len(wanted):
            end = start + 1
            while end < len(wanted) and wanted[end] == wanted[end - 1] + 1:
                end += 1
            data[start:end].copy_(rows[wanted[start] : wanted[start] + end - start])
            start = end
        return data

    def close(self) -> None:
        """Unregisters the arena; blocks no reader took go to the store first (a drained
        prefill worker's last hand-offs stay readable)."""
        if self.arena is None:
            return
        try:
            self._retire(range(self.arena.num_rows))
        finally:
            self.index.unregister(self.arena.arena_id)
            self.arena.close()


def open_lane(
    store: KVStore, runner: ModelRunner, lane_mib: int | None, publishes: bool
) -> LaneTransfer | None:
    """The worker's lane, where its store has one: on CUDA always, on the CPU only when
    ``lane_mib`` (``CacheConfig.handoff_lane_mib``) is given. A worker that ``publishes``
    hand-offs (prefill) gets an arena of ``lane_mib`` (0: none); every other worker reads
    the lane, whatever its own size."""
    if lane_mib is None and runner.device.type != "cuda":
        return None  # the default on the CPU: no lane, nothing to look up on every pull
    index = store.device_lane()
    if index is None:
        return None
    if not publishes:  # a reader reads whatever a prefill worker of the store publishes
        return LaneTransfer(index, runner, store)
    if lane_mib is None:
        total = torch.cuda.get_device_properties(runner.device).total_memory
        lane_mib = min(DEFAULT_LANE_MIB, total // 32 // 2**20)
    if not lane_mib:
        return None
    num_rows = max(1, lane_mib * 2**20 // runner.bytes_per_stored_block)
    return LaneTransfer(index, runner, store, num_rows)
