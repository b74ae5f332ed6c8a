"""GGUF files: model config from metadata and dequantized weights under Hugging Face names."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.config import ModelConfig
from engine.gguf_file import open_gguf

# GGUF tensor name -> Hugging Face name; {i} is the layer index.
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def gguf_model_config(path: Path) -> ModelConfig:
    fields = open_gguf(path).fields
    arch = str(fields["general.architecture"])

    def meta(key: str, default: Any = None) -> Any:
        return fields.get(f"{arch}.{key}", default)

    heads = meta("attention.head_count")
    hidden = meta("embedding_length")
    tensor_names = {t.name for t in open_gguf(path).tensors}
    vocab = meta("vocab_size") or len(fields["tokenizer.ggml.tokens"])
    eos = fields.get("tokenizer.ggml.eos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=meta("feed_forward_length"),
        num_hidden_layers=meta("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=meta("attention.head_count_kv") or heads,
        head_dim=meta("attention.key_length") or hidden // heads,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        max_position_embeddings=meta("context_length", 4096),
        tie_word_embeddings="output.weight" not in tensor_names,
        attention_bias="blk.0.attn_q.bias" in tensor_names,
        sliding_window=meta("attention.sliding_window"),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def hf_name(gguf_name: str) -> str:
    match = _LAYER_RE.match(gguf_name)
    if match:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    base, kind = gguf_name.rsplit(".", 1)
    return f"{_GLOBAL_NAMES[base]}.{kind}"


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: the converter interleaves the two rotary halves
    of each head (GPT-J layout); the model here rotates halves (NeoX layout)."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # (heads, D/2, 2, ...)
    return w.swapaxes(1, 2).reshape(weight.shape)


def iter_gguf_weights(path: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (hf_name, float32 tensor) for every tensor, dequantized."""
    from gguf import dequantize

    llama_rope = config.architecture in ("llama", "mistral")
    for tensor in open_gguf(path).tensors:
        weight = dequantize(tensor.data, tensor.tensor_type)
        name = hf_name(tensor.name)
        if llama_rope and ".attn_q." in tensor.name:
            weight = unpermute_qk(weight, config.num_attention_heads)
        elif llama_rope and ".attn_k." in tensor.name:
            weight = unpermute_qk(weight, config.num_key_value_heads)
        yield (
            name,
            torch.from_numpy(np.array(weight, dtype=np.float32)),
        )  # copy: reader memory is read-only
