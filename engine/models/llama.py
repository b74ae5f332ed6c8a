"""Llama-family decoder: Llama 2/3, Mistral, Qwen2 (QKV bias), Qwen3 (q/k norm) and SmolLM2;
the other families (Phi-3, Gemma 2, the MoE models) are small variations of these classes.

Knows nothing of tensor parallelism, transport or scheduling: the layer types shard
themselves, the attention layer reads the paged cache through ``AttentionMetadata``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from engine.attention import AttentionMetadata, PagedAttention
from engine.config import ModelConfig
from engine.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    default_weight_loader,
    gated_activation,
)

# checkpoint projection -> (fused parameter, shard id)
STACKED_PARAMS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, layer: int) -> None:
        super().__init__()
        d = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            d,
            config.num_attention_heads,
            config.num_key_value_heads,
            bias=config.attention_bias,
        )
        self.o_proj = RowParallelLinear(config.num_attention_heads * d, config.hidden_size)
        self.attn = PagedAttention(
            self.qkv_proj.num_heads,
            self.qkv_proj.num_kv_heads,
            d,
            rotary.cos_sin_cache,
            config.layer_sliding_window(layer),
            config.attention_scale,
            config.attn_logit_softcap,
        )
        # Qwen3: every query and key head is RMS-normalized (one weight shared by the heads).
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if config.qk_norm else None

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        if self.q_norm is not None and self.k_norm is not None:
            d = self.qkv_proj.head_dim
            q = self.q_norm(q.reshape(-1, d))[0].view(q.shape)  # (T * heads, D) rows
            k = self.k_norm(k.reshape(-1, d))[0].view(k.shape)
        return self.o_proj(self.attn(q, k, v, positions, meta))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [size, size])
        self.down_proj = RowParallelLinear(size, config.hidden_size)
        self.act = gated_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, layer: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, layer)
        self.mlp = self.build_mlp(config, layer)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def build_mlp(self, config: ModelConfig, layer: int) -> nn.Module:
        return LlamaMLP(config)


class LlamaModel(nn.Module):
    #: Gemma scales the embeddings by sqrt(hidden_size).
    scales_embeddings = False

    def __init__(
        self, config: ModelConfig, layer_type: type[nn.Module] = LlamaDecoderLayer
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
        )
        self.layers = nn.ModuleList(
            layer_type(config, self.rotary, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.embed_scale = config.hidden_size**0.5

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # (T, hidden)
        if self.scales_embeddings:  # the scale rounded to the activation dtype, as in HF
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, meta)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, model: LlamaModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = model if model is not None else LlamaModel(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Flat (T,) token ids of every sequence in the step -> (T, hidden)."""
        return self.model(input_ids, positions, meta)  # type: ignore[no-any-return]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.lm_head(hidden)
        cap = self.config.final_logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def checkpoint_target(self, name: str) -> tuple[str, Any]:
        """(parameter name, shard id) a checkpoint tensor goes to: Q/K/V and gate/up fuse."""
        parts = name.split(".")
        shard_id = None
        if len(parts) >= 2 and parts[-2] in STACKED_PARAMS:
            fused, shard_id = STACKED_PARAMS[parts[-2]]
            parts[-2] = fused
        return ".".join(parts), shard_id

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Places Hugging Face-named tensors, fusing Q/K/V and gate/up; each layer's
        ``weight_loader`` takes its own tensor-parallel shard."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if (
                "rotary_emb" in name
                or name.endswith(".input_scale")  # activations are scaled per token, on the fly
                or (self.config.tie_word_embeddings and name == "lm_head.weight")
            ):
                continue
            target, shard_id = self.checkpoint_target(name)
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in the model")
            param = params[target]
            module = self.get_submodule(target.rsplit(".", 1)[0])
            loader = getattr(module, "weight_loader", default_weight_loader)
            loader(param, tensor, shard_id)  # the loader casts (or quantizes) its shard
            loaded.add(target)
            if (
                target.endswith(".weight")
                and tensor.element_size() > 1
                and hasattr(module, "weight_scale")
            ):
                loaded.add(f"{target}_scale")  # a float weight was quantized as it was placed
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
