"""Swapping preempted requests' KV blocks to host memory and back (vLLM v0's swap space,
FastServe's proactive offload), instead of recomputing them on resume.

The scheduler side is pure bookkeeping: a pool of host block ids (``SwapSpace``) and the
(device block, host block) copies it lists in each ``SchedulerOutput``. The worker side
(``HostKVCache``) owns the host tensor and makes the copies before the step's forward pass.
Whether a victim is swapped or recomputed is ``SwapCost``'s call: copying its blocks out and
back at the measured copy bandwidth against recomputing its tokens at the measured prefill
rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from engine.block_manager import BlockAllocator, BlockManager
from engine.sequence import Sequence

#: Weight of a new prefill-rate sample in the running average.
EWMA = 0.2


class SwapSpace:
    """Host block ids; ``should_swap`` decides whether a victim is worth copying."""

    def __init__(self, num_blocks: int, should_swap: Callable[[Sequence], bool]) -> None:
        self.allocator = BlockAllocator(num_blocks)
        self.should_swap = should_swap

    def takes(self, seq: Sequence, blocks: BlockManager) -> bool:
        """``seq``'s computed tokens fit the free host blocks and are worth copying."""
        if seq.num_computed_tokens == 0:
            return False
        needed = blocks.blocks_needed(seq.num_computed_tokens)
        return needed <= self.allocator.num_free and self.should_swap(seq)


class SwapCost:
    """Copy bandwidth (measured once, on the caches) and prefill rate (measured as the engine
    runs) decide between swapping and recomputing."""

    def __init__(self, bytes_per_block: int, bytes_per_s: float, block_size: int) -> None:
        self.bytes_per_block = bytes_per_block
        self.bytes_per_s = bytes_per_s
        self.block_size = block_size
        #: None until measured: swapping is taken while nothing says it costs more.
        self.prefill_tokens_per_s: float | None = None

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        if num_tokens <= 0 or seconds <= 0:
            return
        rate = num_tokens / seconds
        previous = self.prefill_tokens_per_s
        self.prefill_tokens_per_s = (
            rate if previous is None else (1 - EWMA) * previous + EWMA * rate
        )

    def should_swap(self, seq: Sequence) -> bool:
        """Out and back in cost less than recomputing the tokens the blocks hold."""
        if self.prefill_tokens_per_s is None:
            return True
        num_blocks = -(-seq.num_computed_tokens // self.block_size)
        copy_s = 2 * num_blocks * self.bytes_per_block / self.bytes_per_s
        recompute_s = seq.num_computed_tokens / self.prefill_tokens_per_s
        return copy_s < recompute_s


class HostKVCache:
    """A host copy of the device cache's geometry; pinned on CUDA."""

    def __init__(self, device_cache: torch.Tensor, num_blocks: int) -> None:
        # (layers, 2, num_blocks, block_size, kv_heads, D), as the device cache.
        shape = list(device_cache.shape)
        shape[2] = num_blocks
        pin = device_cache.device.type == "cuda"
        self.device_cache = device_cache
        self.cache = torch.zeros(shape, dtype=device_cache.dtype, pin_memory=pin)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        device_ids, host_ids = self._indices(pairs)
        blocks = self.device_cache.index_select(2, device_ids.to(self.device_cache.device))
        self.cache.index_copy_(2, host_ids, blocks.cpu())

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        device_ids, host_ids = self._indices(pairs)
        blocks = self.cache.index_select(2, host_ids).to(self.device_cache.device)
        self.device_cache.index_copy_(2, device_ids.to(self.device_cache.device), blocks)

    @staticmethod
    def _indices(pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        device_ids, host_ids = zip(*pairs, strict=True)
        return torch.tensor(device_ids), torch.tensor(host_ids)

    def measure_bytes_per_s(self, num_blocks: int = 8) -> float:
        """Device-to-host copy bandwidth of ``num_blocks`` blocks (host block 0 onwards)."""
        count = min(num_blocks, self.cache.shape[2], self.device_cache.shape[2])
        pairs = [(i, i) for i in range(count)]
        self.swap_out(pairs)  # warm
        start = time.perf_counter()
        self.swap_out(pairs)
        if self.device_cache.device.type == "cuda":
            torch.cuda.synchronize(self.device_cache.device)
        seconds = max(time.perf_counter() - start, 1e-9)
        block_bytes = self.cache[:, :, 0].numel() * self.cache.element_size()
        return count * block_bytes / seconds


class Swapper:
    """The engine's swap path: the scheduler's host pool, the host cache and the cost model."""

    def __init__(self, device_cache: torch.Tensor, swap_space_gib: float, block_size: int) -> None:
        block_bytes = device_cache[:, :, 0].numel() * device_cache.element_size()
        num_blocks = max(1, int(swap_space_gib * (1 << 30)) // block_bytes)
        self.host = HostKVCache(device_cache, num_blocks)
        self.cost = SwapCost(block_bytes, self.host.measure_bytes_per_s(), block_size)
        self.space = SwapSpace(num_blocks, self.cost.should_swap)
        #: Blocks copied out and back in so far.
        self.num_swapped_out = self.num_swapped_in = 0

    def copy(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Swap-outs first: their device blocks may be the ones swap-ins fill."""
        self.host.swap_out(swap_out)
        self.host.swap_in(swap_in)
        self.num_swapped_out += len(swap_out)
        self.num_swapped_in += len(swap_in)
