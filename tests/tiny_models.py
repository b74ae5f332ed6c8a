"""Tiny random checkpoints of every supported family, written by transformers itself
(``save_pretrained``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_COMMON: dict[str, Any] = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    # Wider than the default init so the random logits have clear winners under greedy decoding.
    initializer_range=0.2,
    eos_token_id=None,
    bos_token_id=None,
)


#: Families beyond the Llama ones, each with the feature that sets it apart switched on.
NEW_FAMILIES = ("qwen3", "phi3", "gemma2", "mixtral", "qwen2_moe", "qwen3_moe")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def tiny_config(kind: str) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if kind in NEW_FAMILIES:
        return _new_family_config(kind)

    if kind == "llama3":
        return LlamaConfig(
            **TINY_COMMON,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=False,
        )
    if kind == "mistral":
        return MistralConfig(**TINY_COMMON, sliding_window=None, tie_word_embeddings=False)
    if kind == "mistral_window":
        common = {**TINY_COMMON, "num_key_value_heads": 1}
        return MistralConfig(**common, sliding_window=24, tie_word_embeddings=False)
    if kind == "qwen2":
        return Qwen2Config(**TINY_COMMON, tie_word_embeddings=True, use_sliding_window=False)
    raise ValueError(kind)


def _new_family_config(kind: str) -> Any:
    import transformers as hf

    moe = dict(num_experts_per_tok=2, moe_intermediate_size=48)
    if kind == "qwen3":
        return hf.Qwen3Config(**TINY_COMMON, head_dim=32, tie_word_embeddings=False)
    if kind == "phi3":
        return hf.Phi3Config(**TINY_COMMON, pad_token_id=None, tie_word_embeddings=False)
    if kind == "gemma2":
        return hf.Gemma2Config(
            **{**TINY_COMMON, "num_hidden_layers": 4},
            head_dim=16,
            pad_token_id=None,
            query_pre_attn_scalar=32,  # not head_dim, so the scale is checked
            sliding_window=24,  # sliding on layers 0 and 2, full on 1 and 3
            # Caps low enough that random scores and logits reach them.
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
        )
    if kind == "mixtral":
        return hf.MixtralConfig(**TINY_COMMON, num_local_experts=4, num_experts_per_tok=2)
    if kind == "qwen2_moe":
        return hf.Qwen2MoeConfig(
            **TINY_COMMON,
            num_experts=4,
            shared_expert_intermediate_size=64,
            mlp_only_layers=[1],  # one dense layer between sparse ones
            norm_topk_prob=False,
            **moe,
        )
    return hf.Qwen3MoeConfig(**TINY_COMMON, num_experts=4, norm_topk_prob=True, **moe)


def save_tiny_model(kind: str, directory: Path, max_shard_size: str | None = None) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    config = tiny_config(kind)
    config._attn_implementation = "eager" if kind == "gemma2" else "sdpa"  # no SDPA for softcaps
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if kind in ("qwen2", "qwen2_moe"):  # HF zeroes biases; make the QKV bias path matter
        for name, param in model.named_parameters():
            if name.endswith("proj.bias"):
                param.data.normal_(0, 0.5)
    if kind in ("qwen3", "qwen3_moe", "gemma2"):  # norms start at 1 (or 0 for Gemma)
        for name, param in model.named_parameters():
            if "norm" in name:
                param.data.normal_(float(kind != "gemma2"), 0.3)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(directory), safe_serialization=True, **kwargs)
    save_tiny_tokenizer(directory)
    return directory


def save_tiny_tokenizer(directory: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE trained on a few sentences, so the directory is a complete HF model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "café 你好 🎉 naïve"] * 50
    tokenizer.train_from_iterator(corpus, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|eos|>").save_pretrained(
        str(directory)
    )


def load_hf(directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()


def save_fp8_checkpoint(source: Path, directory: Path, scheme: str) -> Path:
    """An fp8 copy of a float checkpoint, as quantizing tools write them: "channel" in the
    compressed-tensors format (one scale per output row, shape (N, 1)), "tensor" in the
    ``fp8`` format (one scalar scale per projection). Embeddings, norms and biases stay float."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from kernels.quant import FP8_DTYPE, FP8_MAX, quantize_fp8_rows

    directory.mkdir(parents=True)
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, directory / file.name)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not (name.startswith("model.layers.") and name.endswith("proj.weight")):
            out[name] = tensor
            continue
        if scheme == "channel":
            q, scale = quantize_fp8_rows(tensor)
            out[name], out[f"{name}_scale"] = q, scale[:, None].contiguous()
        else:
            scale = tensor.abs().amax().float() / FP8_MAX
            out[name] = (tensor.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            out[f"{name}_scale"] = scale.reshape(())
    save_file(out, str(directory / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    if scheme == "channel":
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
                    "input_activations": {"type": "float", "num_bits": 8, "dynamic": True},
                }
            },
            "ignore": ["lm_head"],
        }
    else:
        config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
