"""Moves KV blocks between a worker's paged cache and the shared store.

A stored block is the K and V of one cache block for every layer, as raw bytes in the cache
dtype, shaped (num_layers, 2, block_size, num_kv_heads, head_dim). Full blocks are named by
the hash chain over their tokens; a prompt's partial last block is named the same way over
its fewer tokens, so its name still fixes its content.
"""

from __future__ import annotations

import logging
import time

from engine.host_publisher import HostPublisher
from engine.lane_transfer import LaneTransfer
from engine.model_runner import ModelRunner
from engine.scheduler import BlockImport, ScheduledChunk
from engine.sequence import Sequence
from kvstore.base import KVStore
from kvstore.block_hash import BlockHash, block_hash, hash_full_blocks
from kvstore.errors import StoreFullError

logger = logging.getLogger(__name__)

# Blocks looked up at once when the lane is asked how much of a prompt it holds.
LOOKUP_WINDOW = 128


def transfer_path(store: KVStore) -> str:
    """How blocks travel through ``store`` (see ``KVStore.block_path``)."""
    return store.block_path


class KVTransfer:
    """``lane``: the device lane of a GPU host, which a prompt's hand-off takes ahead of the
    store (``engine.lane_transfer``); None moves every block through the store."""

    def __init__(
        self,
        store: KVStore,
        runner: ModelRunner,
        namespace: bytes,
        lane: LaneTransfer | None = None,
    ) -> None:
        self.store = store
        self.lane = lane
        self.runner = runner
        self.block_size = runner.block_size
        self.namespace = namespace
        #: The data path every hand-off of this worker takes (see ``transfer_path``).
        self.path = transfer_path(store)
        #: Blocks filled from the store so far (metrics and tests).
        self.num_loaded_blocks = 0
        #: Of those, blocks pulled while the prompt was still being prefilled elsewhere.
        self.num_prefetched_blocks = 0
        #: Blocks of finished requests (prompt and output) published as prefix cache.
        self.num_retained_blocks = 0
        #: Writes finished requests' blocks to the store off the engine's thread (GPU decode
        #: workers; ``engine.host_publisher``); None writes them at once.
        self.publisher: HostPublisher | None = None
        #: Seconds spent reading blocks out of the cache into the store (prefill's share of
        #: the hand-off; benchmarks).
        self.publish_s = 0.0

    def prompt_hashes(
        self, prompt: list[int], known: list[BlockHash] | None = None
    ) -> list[BlockHash]:
        """Names of the prompt's blocks, the partial last one included."""
        hashes = hash_full_blocks(
            prompt, self.block_size, self.namespace, (known or [])[: len(prompt) // self.block_size]
        )
        tail = len(prompt) % self.block_size
        if tail:
            parent = hashes[-1] if hashes else None
            hashes.append(block_hash(parent, prompt[-tail:], self.namespace))
        return hashes

    def publish_full(self, seq: Sequence) -> None:
        """Publishes the prompt's full blocks computed since the last call (chunk by chunk)."""
        num_full = min(seq.num_computed_tokens, len(seq.prompt_token_ids)) // self.block_size
        start = seq.num_published_blocks
        if num_full <= start:
            return
        # Hashes exist even when the local prefix cache is off.
        seq.block_hashes = hash_full_blocks(
            seq.token_ids, self.block_size, self.namespace, seq.block_hashes
        )
        hashes = seq.block_hashes[start:num_full]
        self._put(seq.request_id, seq.block_table[start:num_full], hashes, handoff=True)
        seq.num_published_blocks = num_full

    def publish_prompt(self, seq: Sequence) -> list[BlockHash]:
        """Publishes whatever of the prompt is not yet in the store; returns every name."""
        hashes = self.prompt_hashes(seq.prompt_token_ids, seq.block_hashes)
        start = seq.num_published_blocks
        self._put(
            seq.request_id, seq.block_table[start : len(hashes)], hashes[start:], handoff=True
        )
        seq.num_published_blocks = len(hashes)
        return hashes

    def retain_finished(self, seqs: list[Sequence]) -> None:
        """Leaves every computed full block of finished requests (prompt and output) in the
        store, unpinned: the prefix cache that a conversation's next turn, or any prompt
        sharing the prefix, is prefilled from. Best effort: a full store skips it.

        A request's last token (often the end-of-turn token, which the next turn's prompt
        repeats) has no KV yet; when it fills a block, one forward pass computes it, so the
        stored chain covers every token the model wrote."""
        tails = [
            ScheduledChunk(seq, seq.num_tokens - 1, seq.num_tokens, completes=False)
            for seq in seqs
            if seq.num_tokens % self.block_size == 0
            and seq.num_computed_tokens == seq.num_tokens - 1
            and len(seq.block_table) * self.block_size >= seq.num_tokens
        ]
        if tails:
            self.runner.execute(tails)  # no row is sampled: it only writes the K/V
            for tail in tails:
                tail.seq.num_computed_tokens = tail.end
        for seq in seqs:
            self._retain(seq)

    def _retain(self, seq: Sequence) -> None:
        num_full = seq.num_computed_tokens // self.block_size
        if num_full == 0 or not seq.block_table:
            return
        # Only the computed tokens: a full block holding the uncomputed last token is not.
        hashes = hash_full_blocks(
            seq.tokens_between(0, num_full * self.block_size),
            self.block_size,
            self.namespace,
            seq.block_hashes[:num_full],
        )
        start = self.store.match_prefix(hashes)  # only what the store lacks is read out
        owner = f"{seq.request_id}/retain"
        if self.publisher is not None and start < num_full:
            rows = self.runner.device_rows(seq.block_table[start:num_full])
            if not self.publisher.submit(owner, hashes[start:], rows):
                logger.info("not retaining %s: the host publisher is full", seq.request_id)
            return
        try:
            self._put(owner, seq.block_table[start:num_full], hashes[start:])
            self.num_retained_blocks += num_full - start
        except StoreFullError as error:
            logger.info("not retaining %s: %s", seq.request_id, error)
        finally:
            self.store.release(owner)

    def _put(
        self, owner: str, block_ids: list[int], hashes: list[BlockHash], handoff: bool = False
    ) -> None:
        """Publishes blocks; a prompt's hand-off (``handoff``) goes through the lane when
        there is one, unpinned (the lane is not the store: its reader takes it from there)."""
        if not block_ids:
            return
        # Reading blocks waits for the step that computed them anyway; waiting first keeps
        # the device's compute time out of ``publish_s`` (the transfer's own cost).
        self.runner.wait_device()
        start = time.perf_counter()
        if handoff and self.lane is not None and self.lane.can_publish(len(block_ids)):
            self.lane.publish(block_ids, hashes)
        else:
            data = self.runner.read_blocks(block_ids)
            self.store.put(owner, list(zip(hashes, data, strict=True)))
        self.publish_s += time.perf_counter() - start

    def match_prefix(self, hashes: list[BlockHash]) -> int:
        """How many leading blocks of ``hashes`` the lane or the store holds (looked up a
        window at a time: a decode worker asks this every few milliseconds)."""
        if self.lane is None:
            return self.store.match_prefix(hashes)
        count = 0
        while count < len(hashes):
            window = hashes[count : count + LOOKUP_WINDOW]
            found = self._match_window(window)
            count += found
            if found < len(window):
                break
        return count

    def _match_window(self, hashes: list[BlockHash]) -> int:
        assert self.lane is not None
        in_lane = [slot is not None for slot in self.lane.reachable(hashes)] + [True]
        count = 0
        while count < len(hashes):
            if in_lane[count]:
                count += 1
                continue
            gap_end = in_lane.index(True, count)  # the store must hold the whole gap
            count += self.store.match_prefix(hashes[count:gap_end])
            if count < gap_end:
                break
        return count

    def stored_prefix(self, prompt: list[int]) -> list[BlockHash] | None:
        """Names of the prompt's leading full blocks that the store holds, leaving at least
        one token to compute; None when there are none."""
        hashes = hash_full_blocks(prompt, self.block_size, self.namespace)
        usable = (len(prompt) - 1) // self.block_size
        count = min(self.store.match_prefix(hashes), usable)
        return hashes[:count] or None

    def load(self, imp: BlockImport, keep_pins: bool) -> None:
        """Fills the request's blocks from the store. A decode worker then drops the request's
        pins (it holds its own copy); a prefill worker keeps them for the decode worker, which
        will read the same blocks."""
        owner = imp.seq.request_id
        try:
            self.fill(owner, imp.block_ids, imp.hashes)
        finally:
            if not keep_pins:
                self.store.release(owner)

    def fill(self, owner: str, block_ids: list[int], hashes: list[BlockHash]) -> None:
        """Copies the named blocks into ``block_ids``, pinning them for ``owner``; KeyError
        if one is missing."""
        if not block_ids:
            return
        if self.lane is None:
            self._fill_from_store(owner, block_ids, hashes, list(range(len(hashes))))
        else:
            self._fill_through_lane(owner, block_ids, hashes)
        self.num_loaded_blocks += len(block_ids)

    def _fill_through_lane(self, owner: str, block_ids: list[int], hashes: list[BlockHash]) -> None:
        """Lane first, the store for the rest. Copies are confirmed only once the store part
        succeeded (a confirmed row may be reused at once); a block that changed slot during
        its copy is copied again from its new slot (republished), else from the store."""
        assert self.lane is not None
        copied = self.lane.copy(block_ids, hashes)
        in_lane = {i for i, _ in copied}
        self._fill_from_store(
            owner, block_ids, hashes, [i for i in range(len(hashes)) if i not in in_lane]
        )
        moved = self.lane.confirm(hashes, copied)
        if moved:
            again = self.lane.copy([block_ids[i] for i in moved], [hashes[i] for i in moved])
            lost = set(self.lane.confirm([hashes[i] for i in moved], again))
            lost |= set(range(len(moved))) - {i for i, _ in again}
            self._fill_from_store(owner, block_ids, hashes, [moved[i] for i in sorted(lost)])

    def _fill_from_store(
        self, owner: str, block_ids: list[int], hashes: list[BlockHash], positions: list[int]
    ) -> None:
        if positions:
            data = self.store.get(owner, [hashes[i] for i in positions])
            self.runner.write_blocks([block_ids[i] for i in positions], data)
