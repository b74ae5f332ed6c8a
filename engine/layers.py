"""Layer types the model files are built from. Tensor parallelism lives here: each linear layer
holds only its rank's shard and its ``weight_loader`` narrows a full checkpoint tensor to it."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine import ops
from engine.config import RopeScaling
from engine.parallel import current_group, divide
from engine.quantization import copy_rows, current_linear_method


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def _copy_into(param: torch.Tensor, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"checkpoint shape {tuple(loaded.shape)} != parameter {tuple(param.shape)}"
        )
    param.data.copy_(loaded)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Replicated parameters (norms) take the whole checkpoint tensor."""
    copy_rows(param, 0, loaded)


class LinearBase(nn.Module):
    """A linear layer's weight as its method stores it (``engine.quantization``): the model's
    dtype, or one-byte values with per-row ``weight_scale``."""

    weight: nn.Parameter
    weight_scale: nn.Parameter

    def __init__(self, rows: int, cols: int, bias_rows: int | None) -> None:
        super().__init__()
        self.tp = current_group()
        self.rank, self.world = self.tp.rank, self.tp.size
        self.method = current_linear_method()
        self.method.create_weights(self, rows, cols)
        self.bias = _param(bias_rows) if bias_rows else None

    def is_scale(self, param: torch.Tensor) -> bool:
        return param is getattr(self, "weight_scale", None)

    def rows_of(
        self, param: torch.Tensor, loaded: torch.Tensor, rows: int, shard: int
    ) -> torch.Tensor:
        """Shard ``shard`` of ``rows`` rows; a per-tensor scale (one value) covers them all."""
        if self.is_scale(param):
            loaded = loaded.reshape(-1).float()
            if loaded.numel() == 1:
                return loaded.expand(rows)
        return loaded.narrow(0, shard * rows, rows)

    def place(self, param: torch.Tensor, offset: int, loaded: torch.Tensor) -> None:
        self.method.load(self, param, offset, loaded)

    def fill_dummy(self) -> None:
        self.method.fill_dummy(self)


class ColumnParallelLinear(LinearBase):
    """y = x W^T + b with W split by output rows; each rank returns its slice of y."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        rows = divide(output_size, current_group().size)
        super().__init__(rows, input_size, rows if bias else None)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        self.place(param, 0, self.rows_of(param, loaded, param.shape[0], self.rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one GEMM (gate + up)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        super().__init__(input_size, sum(output_sizes), bias)
        self.output_sizes = output_sizes

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        rows = divide(self.output_sizes[shard_id], self.world)
        offset = sum(divide(size, self.world) for size in self.output_sizes[:shard_id])
        self.place(param, offset, self.rows_of(param, loaded, rows, self.rank))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one GEMM. KV heads are split across ranks, or replicated
    when there are fewer KV heads than ranks."""

    def __init__(
        self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool
    ) -> None:
        world = current_group().size
        self.num_heads = divide(num_heads, world)
        self.num_kv_heads = max(1, num_kv_heads // world)
        self.kv_replicas = max(1, world // num_kv_heads)
        self.head_dim = head_dim
        local_out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden_size, local_out * world, bias)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        q_rows = self.num_heads * self.head_dim
        kv_rows = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, rows, shard = 0, q_rows, self.rank
        else:
            offset = q_rows if shard_id == "k" else q_rows + kv_rows
            rows, shard = kv_rows, self.rank // self.kv_replicas
        self.place(param, offset, self.rows_of(param, loaded, rows, shard))

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        return qkv.split([q_size, kv_size, kv_size], dim=-1)  # type: ignore[return-value]


class RowParallelLinear(LinearBase):
    """y = x W^T + b with W split by input columns; partial sums meet in one all-reduce."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        cols = divide(input_size, current_group().size)
        super().__init__(output_size, cols, output_size if bias else None)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        if param.dim() == 2:
            cols = param.shape[1]
            loaded = loaded.narrow(1, self.rank * cols, cols)
        elif self.is_scale(param):  # every rank scales the whole output rows
            loaded = self.rows_of(param, loaded, param.shape[0], 0)
        self.place(param, 0, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tp.all_reduce(self.method.apply(self, x, None))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank embeds the ids it owns."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.tp = current_group()
        self.rank, self.world = self.tp.rank, self.tp.size
        self.vocab_per_rank = math.ceil(vocab_size / self.world)
        self.vocab_start = self.rank * self.vocab_per_rank
        self.vocab_size = vocab_size
        self.weight = _param(self.vocab_per_rank, hidden_size)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        shard = loaded[self.vocab_start : self.vocab_start + self.vocab_per_rank]
        param.data.zero_()
        param.data[: shard.shape[0]].copy_(shard)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        owned = (local >= 0) & (local < self.vocab_per_rank)
        out = F.embedding(local.clamp(0, self.vocab_per_rank - 1), self.weight)
        return self.tp.all_reduce(out * owned.unsqueeze(-1).to(out.dtype))


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states to logits; each rank scores its vocabulary slice."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.all_gather(ops.linear(hidden, self.weight, None), dim=-1)
        return logits[..., : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = _param(hidden_size)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new_residual); with no residual, the input is the residual."""
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps), x
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class SiluAndMul(nn.Module):
    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return ops.silu_and_mul(gate_up)


class GeluTanhAndMul(nn.Module):
    """GeGLU (Gemma): tanh-approximated GELU of the gate times up."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh_and_mul(gate_up)


def gated_activation(name: str) -> nn.Module:
    return GeluTanhAndMul() if name == "gelu_tanh" else SiluAndMul()


class OffsetRMSNorm(RMSNorm):
    """Gemma's norm scales by (1 + weight); the loader stores 1 + weight so the forward is
    the plain RMSNorm."""

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None
    ) -> None:
        _copy_into(param, loaded.float().add(1.0).to(param.dtype))


class ReplicatedLinear(nn.Module):
    """A small projection every rank holds whole (MoE routers, Qwen2-MoE's shared gate)."""

    def __init__(self, input_size: int, output_size: int) -> None:
        super().__init__()
        self.weight = _param(output_size, input_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    # Llama 3: long wavelengths are slowed by `factor`, short ones kept, the band between
    # interpolated smoothly.
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Holds the float32 (max_positions, head_dim) table [cos | sin] of position * inv_freq."""

    def __init__(
        self, head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.cos_sin_cache: torch.Tensor
        self.register_buffer(
            "cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False
        )
