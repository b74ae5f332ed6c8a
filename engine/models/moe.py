"""Sparse (mixture-of-experts) decoders: Mixtral (top-2 of 8, renormalized), Qwen2-MoE
(a sigmoid-gated shared expert beside the routed ones) and Qwen3-MoE (q/k norm, top-k
renormalized by ``norm_topk_prob``). The Llama decoder with a sparse MLP in place of the
dense one (Qwen keeps dense MLPs in its ``dense_layers``)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from engine.config import ModelConfig
from engine.layers import ReplicatedLinear
from engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel
from engine.moe import FusedMoE, route
from engine.parallel import current_group

#: Hugging Face expert projection -> which part of the fused expert weights it is.
EXPERT_PARTS = {
    "w1": "gate",
    "gate_proj": "gate",
    "w3": "up",
    "up_proj": "up",
    "w2": "down",
    "down_proj": "down",
}
_EXPERT = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(\w+)\.weight$")


class SparseMoeBlock(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        moe = config.moe
        assert moe is not None
        self.tp = current_group()
        self.top_k, self.renormalize = moe.num_experts_per_tok, moe.norm_topk_prob
        self.gate = ReplicatedLinear(config.hidden_size, moe.num_experts)
        self.experts = FusedMoE(
            moe.num_experts, config.hidden_size, moe.moe_intermediate_size, config.hidden_act
        )
        shared = moe.shared_expert_intermediate_size
        self.shared_expert = LlamaMLP(config, shared) if shared else None
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1) if shared else None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(T, H) -> (T, H)."""
        topk_weights, topk_ids = route(self.gate(hidden), self.top_k, self.renormalize)
        out = self.tp.all_reduce(self.experts(hidden, topk_weights, topk_ids))
        if self.shared_expert is not None and self.shared_expert_gate is not None:
            gate = torch.sigmoid(self.shared_expert_gate(hidden))  # (T, 1)
            out = out + gate * self.shared_expert(hidden)
        return out


class MoeDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config: ModelConfig, layer: int) -> nn.Module:
        assert config.moe is not None
        if layer in config.moe.dense_layers:
            return LlamaMLP(config)
        return SparseMoeBlock(config)


class MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, LlamaModel(config, MoeDecoderLayer))

    def checkpoint_target(self, name: str) -> tuple[str, Any]:
        """Expert tensors go to their layer's fused expert weights with (expert, part) as the
        shard id; Mixtral's ``block_sparse_moe`` is this model's ``mlp``."""
        name = name.replace(".block_sparse_moe.", ".mlp.")
        match = _EXPERT.match(name)
        if match is None:
            return super().checkpoint_target(name)
        prefix, expert, projection = match.groups()
        part = EXPERT_PARTS[projection]
        param = "w2_weight" if part == "down" else "w13_weight"
        return f"{prefix}.{param}", (int(expert), part)
