"""Phi-3: the Llama decoder, with Q/K/V and gate/up already fused in the checkpoint. The fused
tensors are split back into their parts so each part takes its own tensor-parallel shard
(a fused row block cannot simply be narrowed: Q, K and V shard differently)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from engine.config import ModelConfig
from engine.models.llama import LlamaForCausalLM


def split_fused(
    weights: Iterable[tuple[str, torch.Tensor]], config: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Renames ``qkv_proj`` / ``gate_up_proj`` tensors to their q/k/v and gate/up parts."""
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    for name, tensor in weights:
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".qkv_proj"):
            base = prefix.removesuffix("qkv_proj")
            q, k, v = tensor.split([q_rows, kv_rows, kv_rows], dim=0)
            yield from (
                (f"{base}{p}_proj.{leaf}", t) for p, t in zip("qkv", (q, k, v), strict=True)
            )
        elif prefix.endswith(".gate_up_proj"):
            base = prefix.removesuffix("gate_up_proj")
            gate, up = tensor.chunk(2, dim=0)
            yield f"{base}gate_proj.{leaf}", gate
            yield f"{base}up_proj.{leaf}", up
        else:
            yield name, tensor


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(split_fused(weights, self.config))
