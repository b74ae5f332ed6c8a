"""Paged attention layer and the per-step metadata the model runner builds for it."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine import ops


@dataclass(frozen=True)
class AttentionMetadata:
    """Where this step's tokens go in the paged cache and what each query may attend to."""

    #: (num_tokens,) int64 cache slot of each new token (block_id * block_size + offset).
    slot_mapping: torch.Tensor
    #: (num_seqs, max_blocks_per_seq) int32, padded with 0.
    block_tables: torch.Tensor
    #: (num_seqs,) int32 context length after this step's tokens.
    seq_lens: torch.Tensor
    #: (num_seqs + 1,) int32 prefix sums of query lengths.
    cu_seqlens_q: torch.Tensor
    #: Every sequence has exactly one query token (a pure decode step).
    is_decode: bool


class PagedAttention(nn.Module):
    """Rotary embedding, KV-cache write and attention over the paged cache."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        cos_sin_cache: torch.Tensor,
        sliding_window: int | None,
        scale: float | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale if scale is not None else head_dim**-0.5
        #: Gemma 2 caps scores at softcap * tanh(score / softcap); None: uncapped.
        self.softcap = softcap
        self.sliding_window = sliding_window
        self.cos_sin_cache = cos_sin_cache
        # (num_blocks, block_size, num_kv_heads, head_dim) each; bound by the model runner.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: (T, heads * D), k and v: (T, kv_heads * D) -> (T, heads * D)."""
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        q, _ = ops.rope_and_cache(
            q, k, v, positions, self.cos_sin_cache, self.k_cache, self.v_cache, meta.slot_mapping
        )
        if meta.is_decode:
            out = ops.paged_decode_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.block_tables,
                meta.seq_lens,
                self.scale,
                self.sliding_window,
                self.softcap,
            )
        else:
            out = ops.paged_attention(
                q,
                self.k_cache,
                self.v_cache,
                meta.block_tables,
                meta.cu_seqlens_q,
                meta.seq_lens,
                self.scale,
                self.sliding_window,
                self.softcap,
            )
        return out.flatten(1)
