"""Pipelined hand-off on a decode worker: pull a request's prompt blocks from the store while
a prefill worker is still computing them.

A prefetched request holds blocks for its whole prompt from the moment it arrives. Every
engine iteration (and every few milliseconds while the engine is otherwise idle) copies the
leading blocks the store holds by now into them, in chain order. When the first token comes
(``resume``), only the blocks published since the last pull are left to copy; the request
then joins the scheduler as a plain decode whose prompt is computed. The store pins the
request's blocks until then, so none is evicted half-way; aborting frees blocks and pins.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.errors import InvalidRequestError
from engine.kv_transfer import KVTransfer
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from kvstore.block_hash import BlockHash


@dataclass
class _Pending:
    seq: Sequence
    #: Store names of the prompt's blocks (the last may be partial).
    hashes: list[BlockHash]
    #: Leading blocks already in the worker's cache; None when no blocks were free, and the
    #: request imports everything at admission, as without pipelining.
    num_filled: int | None


class Prefetcher:
    def __init__(self, kv: KVTransfer, blocks: BlockManager, scheduler: Scheduler) -> None:
        self.kv = kv
        self.blocks = blocks
        self.scheduler = scheduler
        self.pending: dict[str, _Pending] = {}

    def start(self, seq: Sequence) -> None:
        """Reserves blocks for the prompt of ``seq`` (local prefix hits shared) and pulls what
        the store already holds."""
        hashes = self.kv.prompt_hashes(seq.prompt_token_ids)
        seq.status = SequenceStatus.PREFETCHING
        hits = self.blocks.match_prefix(seq)
        num_new = len(seq.prompt_token_ids) - len(hits) * self.blocks.block_size
        num_filled = None
        if self.blocks.can_allocate(seq, num_new, hits):
            self.blocks.allocate(seq, num_new, hits)
            seq.num_computed_tokens = len(hits) * self.blocks.block_size
            num_filled = len(hits)
        self.pending[seq.request_id] = _Pending(seq, hashes, num_filled)
        self._pull(self.pending[seq.request_id])

    def pull(self) -> None:
        """Copies every pending request's newly published blocks."""
        for pending in self.pending.values():
            self._pull(pending)

    def _pull(self, pending: _Pending) -> None:
        if pending.num_filled is None:
            return
        start = pending.num_filled
        count = self.kv.match_prefix(pending.hashes[start:])
        if count == 0:
            return
        try:
            self._fill(pending, start + count)
        except KeyError:  # evicted between the lookup and the read: try again later
            return
        self.kv.num_prefetched_blocks += count

    def _fill(self, pending: _Pending, end: int) -> None:
        seq, start = pending.seq, pending.num_filled
        assert start is not None
        self.kv.fill(seq.request_id, seq.block_table[start:end], pending.hashes[start:end])
        pending.num_filled = end
        num_prompt = len(seq.prompt_token_ids)
        seq.num_computed_tokens = min(end * self.blocks.block_size, num_prompt)

    def resume(self, seq: Sequence, first_token_id: int, hashes: list[BlockHash]) -> None:
        """The prefill is done: copies the remaining blocks and queues ``seq`` to decode after
        ``first_token_id``."""
        pending = self.pending.get(seq.request_id)
        if pending is None:
            raise InvalidRequestError(f"request {seq.request_id!r} is not waiting for a prefill")
        if hashes != pending.hashes:
            raise InvalidRequestError(
                f"the prefill worker named other blocks for {seq.request_id!r} than its prompt's"
            )
        del self.pending[seq.request_id]
        seq.append_token(first_token_id, None)
        seq.status = SequenceStatus.WAITING
        if pending.num_filled is None:  # no blocks were free: import at admission
            seq.kv_import = pending.hashes
        else:
            self._finish_fill(pending)
        self.scheduler.add(seq)

    def _finish_fill(self, pending: _Pending) -> None:
        seq = pending.seq
        try:
            self._fill(pending, len(pending.hashes))
        except KeyError:  # evicted after all: recompute the prompt instead
            self.blocks.free(seq)
            seq.kv_import = None
        finally:
            self.kv.store.release(seq.request_id)

    def discard(self, request_id: str) -> None:
        """Forgets an aborted request (its blocks are freed by the scheduler)."""
        self.pending.pop(request_id, None)
