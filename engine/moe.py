"""The sparse MLP's layer types: the router and the experts of one layer.

Expert parallelism lives here as tensor parallelism does in ``engine.layers``: a rank holds
the experts of its expert-parallel slice (each sharded over the rest of the group, like a
dense MLP) and its ``weight_loader`` skips every other expert. Under tensor parallelism every
rank already has every token's hidden state, so tokens need no dispatch: each rank runs the
pairs routed to its experts and one all-reduce combines the partial sums, the same collective
a row-parallel projection ends with.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine import ops
from engine.layers import _copy_into, _param
from engine.parallel import current_group, divide


def route(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over experts (float32), the top ``top_k``, optionally rescaled to sum to 1:
    (T, E) logits -> (T, K) float32 weights and (T, K) int64 expert ids."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    """This rank's experts of one layer: ``w13_weight`` (local E, 2 * local I, H) gate rows
    then up rows, ``w2_weight`` (local E, H, local I). Returns this rank's partial sums."""

    def __init__(
        self, num_experts: int, hidden_size: int, intermediate_size: int, activation: str
    ) -> None:
        super().__init__()
        self.tp = current_group()
        self.split = self.tp.experts_split
        self.num_local_experts = divide(num_experts, self.split.ep_size)
        self.first_expert = self.split.ep_rank * self.num_local_experts
        self.local_intermediate = divide(intermediate_size, self.split.tp_size)
        self.activation = activation
        self.w13_weight = _param(self.num_local_experts, 2 * self.local_intermediate, hidden_size)
        self.w2_weight = _param(self.num_local_experts, hidden_size, self.local_intermediate)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        """``shard_id`` = (global expert, "gate" | "up" | "down"); other ranks' experts are
        skipped."""
        expert, kind = shard_id
        local = expert - self.first_expert
        if not 0 <= local < self.num_local_experts:
            return
        rows, start = self.local_intermediate, self.split.tp_rank * self.local_intermediate
        if kind == "down":  # (H, I): shard the input columns
            _copy_into(param.data[local], loaded.narrow(1, start, rows))
            return
        offset = 0 if kind == "gate" else rows
        _copy_into(param.data[local].narrow(0, offset, rows), loaded.narrow(0, start, rows))

    def forward(
        self, hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
    ) -> torch.Tensor:
        """(T, H) tokens and their (T, K) routes -> (T, H) partial sums of this rank's experts."""
        local_ids = topk_ids - self.first_expert  # other ranks' experts fall outside [0, E)
        return ops.fused_moe(
            hidden, self.w13_weight, self.w2_weight, topk_weights, local_ids, self.activation
        )
