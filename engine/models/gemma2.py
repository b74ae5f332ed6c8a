"""Gemma 2: the Llama decoder with GeGLU, sandwich norms (a norm after attention and after the
MLP as well as before each), (1 + weight) norms, embeddings scaled by sqrt(hidden), score and
logit soft-capping and sliding-window attention on every other layer. The attention, MLP and
cache are Llama's; the config carries the activation, scale, caps and per-layer windows."""

from __future__ import annotations

import torch
from torch import nn

from engine.attention import AttentionMetadata
from engine.config import ModelConfig
from engine.layers import OffsetRMSNorm, RotaryEmbedding
from engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, LlamaModel


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, layer: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, layer)
        self.mlp = LlamaMLP(config)
        size, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = OffsetRMSNorm(size, eps)
        self.post_attention_layernorm = OffsetRMSNorm(size, eps)
        self.pre_feedforward_layernorm = OffsetRMSNorm(size, eps)
        self.post_feedforward_layernorm = OffsetRMSNorm(size, eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # ``hidden`` arrives as the previous layer's normed MLP output, not yet added to the
        # residual stream: the fused add+norm does that addition.
        hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, meta))[0]
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden))[0], residual


class Gemma2Model(LlamaModel):
    scales_embeddings = True

    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, Gemma2DecoderLayer)
        self.norm = OffsetRMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma2ForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config, Gemma2Model(config))
