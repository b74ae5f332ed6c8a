"""Moves KV blocks between a worker's paged cache and the shared store.

A stored block is the K and V of one cache block for every layer, as raw bytes in the cache
dtype, shaped (num_layers, 2, block_size, num_kv_heads, head_dim). Full blocks are named by
the hash chain over their tokens; a prompt's partial last block is named the same way over
its fewer tokens, so its name still fixes its content.
"""

from __future__ import annotations

from engine.model_runner import ModelRunner
from engine.scheduler import BlockImport
from engine.sequence import Sequence
from kvstore.base import KVStore
from kvstore.block_hash import BlockHash, block_hash, hash_full_blocks


class KVTransfer:
    def __init__(self, store: KVStore, runner: ModelRunner, namespace: bytes) -> None:
        self.store = store
        self.runner = runner
        self.block_size = runner.block_size
        self.namespace = namespace
        #: Blocks filled from the store so far (metrics and tests).
        self.num_loaded_blocks = 0

    def prompt_hashes(self, seq: Sequence) -> list[BlockHash]:
        """Names of the prompt's blocks, the partial last one included."""
        prompt = seq.prompt_token_ids
        hashes = hash_full_blocks(
            prompt,
            self.block_size,
            self.namespace,
            seq.block_hashes[: len(prompt) // self.block_size],
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
        self._put(seq.request_id, seq.block_table[start:num_full], hashes)
        seq.num_published_blocks = num_full

    def publish_prompt(self, seq: Sequence) -> list[BlockHash]:
        """Publishes whatever of the prompt is not yet in the store; returns every name."""
        hashes = self.prompt_hashes(seq)
        start = seq.num_published_blocks
        self._put(seq.request_id, seq.block_table[start : len(hashes)], hashes[start:])
        seq.num_published_blocks = len(hashes)
        return hashes

    def _put(self, owner: str, block_ids: list[int], hashes: list[BlockHash]) -> None:
        if block_ids:
            data = self.runner.read_blocks(block_ids)
            self.store.put(owner, list(zip(hashes, data, strict=True)))

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
            self.runner.write_blocks(imp.block_ids, self.store.get(owner, imp.hashes))
            self.num_loaded_blocks += len(imp.block_ids)
        finally:
            if not keep_pins:
                self.store.release(owner)
