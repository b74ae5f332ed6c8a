"""Quantized linear weights at load: the flag and its variable, tensor-parallel shards
quantized like the bf16 ones are split, dummy weights, and fp8 checkpoints that already
carry their scales (loaded as they are, never quantized again)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from engine.args import add_engine_args, engine_config_from
from engine.config import CacheConfig, EngineConfig, ModelConfig, checkpoint_quantization
from engine.layers import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.llm import LLM
from engine.model_runner import build_model
from engine.model_source import resolve_model
from engine.parallel import TPGroup, tensor_parallel
from engine.quantization import linear_method
from engine.sampling_params import SamplingParams
from kernels.quant import FP8_DTYPE, quantize_fp8_rows, quantize_int8_rows
from tests.tiny_models import save_fp8_checkpoint, save_tiny_model

QUANTIZERS = {"int8": quantize_int8_rows, "fp8": quantize_fp8_rows}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return parser.parse_args(list(argv))


def test_flag_and_variable() -> None:
    assert engine_config_from(parse("--device", "cpu"), {}).quantization is None
    environ = {"PDMESH_QUANTIZATION": "fp8"}
    assert engine_config_from(parse("--device", "cpu"), environ).quantization == "fp8"
    flagged = engine_config_from(parse("--device", "cpu", "--quantization", "int8"), environ)
    assert flagged.quantization == "int8"
    with pytest.raises(ValueError, match="quantization must be one of"):
        EngineConfig(device="cpu", quantization="int4")


@pytest.mark.parametrize("method", ["int8", "fp8"])
@pytest.mark.parametrize("rank", [0, 1])
def test_tensor_parallel_shards_are_quantized_as_split(method: str, rank: int) -> None:
    """Rank r of 2 holds quantize(its float shard): rows of column-parallel layers (Q, K, V
    and gate, up placed side by side) and columns of row-parallel ones."""
    torch.manual_seed(rank)
    quantize = QUANTIZERS[method]
    with tensor_parallel(TPGroup(rank, 2)), linear_method(method):
        qkv = QKVParallelLinear(32, 8, num_heads=4, num_kv_heads=2, bias=True)
        gate_up = MergedColumnParallelLinear(32, [48, 48])
        down = RowParallelLinear(48, 32)
    q, k, v = torch.randn(32, 32), torch.randn(16, 32), torch.randn(16, 32)
    for shard_id, full in (("q", q), ("k", k), ("v", v)):
        qkv.weight_loader(qkv.weight, full, shard_id)
    bias = torch.randn(32)
    qkv.weight_loader(qkv.bias, bias, "q")
    expected = torch.cat([q[rank * 16 : rank * 16 + 16], k[rank * 8 :][:8], v[rank * 8 :][:8]])
    want_q, want_scale = quantize(expected)
    assert qkv.weight.dtype == want_q.dtype
    assert torch.equal(qkv.weight.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(qkv.weight_scale, want_scale)
    assert torch.equal(qkv.bias[:16], bias[rank * 16 : rank * 16 + 16])  # biases stay float

    gate, up = torch.randn(48, 32), torch.randn(48, 32)
    gate_up.weight_loader(gate_up.weight, gate, 0)
    gate_up.weight_loader(gate_up.weight, up, 1)
    want_q, want_scale = quantize(torch.cat([gate[rank * 24 :][:24], up[rank * 24 :][:24]]))
    assert torch.equal(gate_up.weight.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(gate_up.weight_scale, want_scale)

    w = torch.randn(32, 48)
    down.weight_loader(down.weight, w)
    want_q, want_scale = quantize(w[:, rank * 24 : rank * 24 + 24])
    assert torch.equal(down.weight.view(torch.uint8), want_q.view(torch.uint8))
    assert torch.equal(down.weight_scale, want_scale)


def _tiny_config() -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_dummy_weights_are_quantized_and_embeddings_are_not(method: str) -> None:
    model = build_model(_tiny_config(), None, torch.float32, "cpu", "dummy", method)  # type: ignore[arg-type]
    proj = model.model.layers[0].mlp.down_proj
    assert proj.weight.dtype == (torch.int8 if method == "int8" else FP8_DTYPE)
    assert proj.weight.float().abs().amax() > 0 and (proj.weight_scale > 0).all()
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.std() > 0.01


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("qwen2", tmp_path_factory.mktemp("qwen2"))


def test_checkpoint_quantization_configs() -> None:
    assert checkpoint_quantization(None) is None
    assert checkpoint_quantization({"quant_method": "fp8", "activation_scheme": "dynamic"}) == "fp8"
    compressed = {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}
        },
    }
    assert checkpoint_quantization(compressed) == "fp8"
    with pytest.raises(ValueError, match="unsupported"):
        checkpoint_quantization({"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match="unsupported"):
        checkpoint_quantization({"quant_method": "gptq", "bits": 4})


@pytest.mark.parametrize("scheme", ["channel", "tensor"])
def test_prequantized_fp8_checkpoint_loads_as_stored(
    scheme: str, tiny_dir: Path, tmp_path: Path
) -> None:
    """The checkpoint's fp8 bytes and scales land in the layers unchanged (a per-tensor
    scale covers every row of its projection), and the engine serves it."""
    fp8_dir = save_fp8_checkpoint(tiny_dir, tmp_path / scheme, scheme)
    assert json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    llm = LLM(EngineConfig(model=str(fp8_dir), device="cpu", cache=CacheConfig(block_size=8)))
    runner = llm.engine.runner
    assert runner.quantization == "fp8"
    from safetensors.torch import load_file

    stored = load_file(str(next(fp8_dir.glob("*.safetensors"))))
    proj = runner.model.model.layers[1].self_attn.o_proj
    weight = stored["model.layers.1.self_attn.o_proj.weight"]
    scale = stored["model.layers.1.self_attn.o_proj.weight_scale"].reshape(-1)
    assert torch.equal(proj.weight.view(torch.uint8), weight.view(torch.uint8))
    assert torch.equal(proj.weight_scale, scale.expand(proj.weight_scale.shape))
    qkv = runner.model.model.layers[0].self_attn.qkv_proj
    k_scale = stored["model.layers.0.self_attn.k_proj.weight_scale"].reshape(-1)
    k_rows = qkv.weight_scale[qkv.num_heads * qkv.head_dim :][: qkv.num_kv_heads * qkv.head_dim]
    assert torch.equal(k_rows, k_scale.expand(k_rows.shape))
    if scheme == "channel":  # what quantizing the float checkpoint here would give, too
        ours = LLM(
            EngineConfig(
                model=str(tiny_dir),
                device="cpu",
                quantization="fp8",
                cache=CacheConfig(block_size=8),
            )
        )
        prompts = [[5, 9, 200, 31, 7], list(range(40, 80))]
        params = SamplingParams(max_tokens=8, temperature=0)
        got = [o.token_ids for o in llm.generate(prompts, params)]
        assert got == [o.token_ids for o in ours.generate(prompts, params)]
    with pytest.raises(ValueError, match="cannot serve it as int8"):
        LLM(EngineConfig(model=str(fp8_dir), device="cpu", quantization="int8"))


def test_resolve_default_model_is_not_prequantized() -> None:
    # GGUF sources carry no quantization_config: they are served as float unless asked.
    from engine.model_source import load_model_config

    assert load_model_config(resolve_model(None)).quantization is None
