"""Paged KV bookkeeping: a reference-counted block allocator with a prefix cache, and the
per-sequence block tables built on it. Pure Python; never touches a device."""

from __future__ import annotations

from collections import OrderedDict

from engine.sequence import Sequence
from kvstore.block_hash import BlockHash, hash_full_blocks


class NoFreeBlocksError(RuntimeError):
    pass


class BlockAllocator:
    """Hands out block ids 0..num_blocks-1 with reference counts.

    A block whose count drops to zero goes to the back of the free queue but keeps its hash,
    so a later request with the same prefix can revive it; allocation takes the front of the
    queue (least recently freed), which is when a cached hash is finally forgotten.
    """

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts = [0] * num_blocks
        self.hashes: list[BlockHash | None] = [None] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[BlockHash, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def allocate(self) -> int:
        if not self.free_queue:
            raise NoFreeBlocksError("no free KV blocks")
        block_id, _ = self.free_queue.popitem(last=False)
        old_hash = self.hashes[block_id]
        if old_hash is not None:
            del self.cached[old_hash]
            self.hashes[block_id] = None
        self.ref_counts[block_id] = 1
        return block_id

    def share(self, block_id: int) -> None:
        """One more holder of ``block_id`` (prefix sharing, fork); revives a freed cached block."""
        if self.ref_counts[block_id] == 0:
            del self.free_queue[block_id]
        self.ref_counts[block_id] += 1

    def free(self, block_id: int) -> None:
        if self.ref_counts[block_id] <= 0:
            raise ValueError(f"block {block_id} is already free")
        self.ref_counts[block_id] -= 1
        if self.ref_counts[block_id] == 0:
            self.free_queue[block_id] = None

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self.cached.get(block_hash)

    def register(self, block_id: int, block_hash: BlockHash) -> None:
        """Marks a full, computed block as holding the tokens that ``block_hash`` names."""
        if self.hashes[block_id] is not None or block_hash in self.cached:
            return  # already named, or an identical block already serves this prefix
        self.hashes[block_id] = block_hash
        self.cached[block_hash] = block_id


class BlockManager:
    """Block tables of sequences on top of one allocator."""

    def __init__(
        self, num_blocks: int, block_size: int, namespace: bytes, enable_prefix_caching: bool
    ) -> None:
        self.block_size = block_size
        self.namespace = namespace
        self.enable_prefix_caching = enable_prefix_caching
        self.allocator = BlockAllocator(num_blocks)

    @property
    def num_free_blocks(self) -> int:
        return self.allocator.num_free

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def update_hashes(self, seq: Sequence) -> None:
        seq.block_hashes = hash_full_blocks(
            seq.token_ids, self.block_size, self.namespace, seq.block_hashes
        )

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached block ids of the sequence's leading full blocks; at least one token is left
        to compute so the step that finishes the prompt yields logits."""
        if not self.enable_prefix_caching or seq.block_table:
            return []
        self.update_hashes(seq)
        hits: list[int] = []
        for block_hash in seq.block_hashes:
            block_id = self.allocator.lookup(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        if hits and len(hits) * self.block_size >= seq.num_tokens:
            hits.pop()
        return hits

    def num_new_blocks(self, seq: Sequence, num_new_tokens: int, hits: list[int]) -> int:
        """Fresh blocks the sequence needs to hold ``num_new_tokens`` more computed tokens,
        counting revived cached blocks (which sit in the free queue) as needing a slot."""
        computed = seq.num_computed_tokens + len(hits) * self.block_size
        held = len(seq.block_table) + len(hits)
        revived = sum(1 for b in hits if self.allocator.ref_counts[b] == 0)
        return max(0, self.blocks_needed(computed + num_new_tokens) - held) + revived

    def can_allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int]) -> bool:
        return self.num_new_blocks(seq, num_new_tokens, hits) <= self.allocator.num_free

    def has_room(self, seq: Sequence, num_new_tokens: int) -> bool:
        """The sequence's blocks already hold ``num_new_tokens`` more (no allocation)."""
        return seq.num_computed_tokens + num_new_tokens <= len(seq.block_table) * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int]) -> None:
        """Attaches prefix hits, then grows the block table to cover the new tokens."""
        if not hits and self.has_room(seq, num_new_tokens):
            return
        if not self.can_allocate(seq, num_new_tokens, hits):
            raise NoFreeBlocksError(f"request {seq.request_id} needs more KV blocks")
        for block_id in hits:
            self.allocator.share(block_id)
        seq.block_table.extend(hits)
        seq.num_computed_tokens += len(hits) * self.block_size
        target = self.blocks_needed(seq.num_computed_tokens + num_new_tokens)
        while len(seq.block_table) < target:
            seq.block_table.append(self.allocator.allocate())

    def commit_computed(self, seq: Sequence) -> None:
        """Publishes hashes of full blocks whose K/V are now computed, for prefix reuse."""
        num_full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or num_full <= seq.num_committed_blocks:
            return  # the common decode step: no block filled up
        self.update_hashes(seq)
        num_full = min(num_full, len(seq.block_hashes))
        for index in range(seq.num_committed_blocks, num_full):
            self.allocator.register(seq.block_table[index], seq.block_hashes[index])
        seq.num_committed_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Releases every block of the sequence; its K/V must be recomputed to resume."""
        # Free back to front so a sequence's tail blocks are evicted before its head blocks.
        for block_id in reversed(seq.block_table):
            self.allocator.free(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_committed_blocks = 0
