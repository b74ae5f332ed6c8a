"""Weight offload (ZeRO-Inference style streaming) on the CPU: the ring's copies are plain
copies here, so greedy outputs must equal the plain engine's token for token, for host
memory and per-layer files, resident/streamed splits and tensor-parallel ranks."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from engine.args import add_engine_args, engine_config_from
from engine.config import EngineConfig, ModelConfig, OffloadConfig
from engine.llm import LLM
from engine.model_source import load_model_config, resolve_model
from engine.offload import GIB, meta_model, plan_offload, weight_bytes
from engine.sampling_params import SamplingParams
from engine.weight_stream import DIRECT_ALIGN, aligned_empty, read_into
from tests.test_hf_parity import PROMPTS
from tests.test_tiny_models import random_prompts
from tests.tiny_models import save_tiny_tokenizer, tiny_config

GREEDY = SamplingParams(max_tokens=20, temperature=0)
NUM_TINY_LAYERS = 6


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A six-layer random Llama 3 model, so some layers stay resident and some stream."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("offload_tiny")
    torch.manual_seed(4321)
    config = tiny_config("llama3")
    config.num_hidden_layers = NUM_TINY_LAYERS
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(directory))
    save_tiny_tokenizer(directory)
    return str(directory)


@pytest.fixture(scope="module")
def tiny_expected(tiny_dir: str) -> tuple[list[list[int]], list[list[int]]]:
    prompts = random_prompts(6, seed=21)
    outputs = LLM(EngineConfig(model=tiny_dir, device="cpu")).generate(prompts, GREEDY)
    return prompts, [o.token_ids for o in outputs]


def _budget_for(config: ModelConfig, resident: int, depth: int) -> float:
    """The GiB that hold a float32 model's non-layer weights, ``resident`` layers and the ring
    (and half a layer, so float rounding cannot drop one)."""
    layer, other = weight_bytes(meta_model(config, torch.float32))
    return (other + (resident + depth + 0.5) * layer) / GIB


def test_plan_keeps_what_the_budget_holds() -> None:
    mib = 1 << 20
    layer, other = 100 * mib, 50 * mib
    plan = plan_offload(20, layer, other, budget_gib=1.0, depth=2)
    # 1024 MiB - 50 (embeddings, head) - 200 (two ring slots) leaves 774: 7 whole layers.
    assert (plan.num_resident, plan.num_streamed, plan.depth) == (7, 13, 2)
    assert plan.device_bytes == (50 + 700 + 200) * mib
    assert plan_offload(20, layer, other, None, 3).num_resident == 0
    # 3 streamed layers do not fit beside a 2-deep ring: 3 stream. With 2 left, they would
    # fit in the ring anyway, so every layer stays resident.
    assert plan_offload(5, layer, other, budget_gib=0.5, depth=2).num_resident == 2
    assert plan_offload(4, layer, other, budget_gib=0.5, depth=2).num_resident == 4
    with pytest.raises(ValueError, match="cannot hold the embeddings"):
        plan_offload(20, layer, other, budget_gib=0.2, depth=2)


def test_direct_reads_fill_aligned_buffers(tmp_path: Path) -> None:
    payload = torch.arange(3 * DIRECT_ALIGN, dtype=torch.uint8)
    path = tmp_path / "layer.bin"
    path.write_bytes(bytes(payload.numpy()))
    buffer = aligned_empty(payload.numel(), pin=False)
    assert buffer.data_ptr() % DIRECT_ALIGN == 0
    read_into(path, buffer)
    assert torch.equal(buffer, payload)


@pytest.mark.parametrize(
    ("kind", "resident", "depth"),
    [("cpu", 2, 2), ("cpu", None, 3), ("disk", 1, 3), ("disk", None, 2)],
)
def test_tiny_offload_equals_plain(
    kind: str,
    resident: int | None,
    depth: int,
    tiny_dir: str,
    tiny_expected: tuple[list[list[int]], list[list[int]]],
    tmp_path: Path,
) -> None:
    prompts, expected = tiny_expected
    config = load_model_config(resolve_model(tiny_dir))
    budget = None if resident is None else _budget_for(config, resident, depth)
    offload = OffloadConfig(kind, budget, prefetch_depth=depth, disk_dir=str(tmp_path))
    llm = LLM(EngineConfig(model=tiny_dir, device="cpu", offload=offload))
    got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    assert got == expected
    stream = llm.engine.runner.weight_stream
    assert stream is not None
    streamed = NUM_TINY_LAYERS - (resident or 0)
    assert len(stream.layers) == streamed and stream.depth == depth
    assert stream.num_loads > 10 * streamed  # every step streamed its layers again
    if kind == "disk":
        assert len(list((tmp_path / "rank0").glob("layer_*.bin"))) == streamed


def test_offload_tp2_each_rank_streams_its_shard(
    tiny_dir: str, tiny_expected: tuple[list[list[int]], list[list[int]]], tmp_path: Path
) -> None:
    prompts, expected = tiny_expected
    offload = OffloadConfig("disk", None, prefetch_depth=2, disk_dir=str(tmp_path))
    llm = LLM(EngineConfig(model=tiny_dir, device="cpu", tensor_parallel_size=2, offload=offload))
    try:
        got = [o.token_ids for o in llm.generate(prompts, GREEDY)]
    finally:
        llm.engine.shutdown()
    assert got == expected
    full = (tmp_path / "rank0" / "layer_0000.bin").stat().st_size
    assert (tmp_path / "rank1" / "layer_0000.bin").stat().st_size == full


@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_default_model_offload_equals_plain(kind: str, smol_llm: LLM, tmp_path: Path) -> None:
    # 26 of SmolLM2's 30 layers resident, 4 streamed through a measured ring (the CPU copies
    # every streamed layer each step: few of them keep the test cheap).
    params = SamplingParams(max_tokens=16, temperature=0)
    expected = [o.token_ids for o in smol_llm.generate(PROMPTS[:2], params)]
    config = smol_llm.engine.model_config
    budget = _budget_for(config, config.num_hidden_layers - 4, 2)
    offload = OffloadConfig(kind, budget, prefetch_depth=2, disk_dir=str(tmp_path))
    llm = LLM(EngineConfig(device="cpu", dtype="float32", offload=offload))
    assert [o.token_ids for o in llm.generate(PROMPTS[:2], params)] == expected
    stream = llm.engine.runner.weight_stream
    assert stream is not None and len(stream.layers) == 4


def test_offload_flags_and_variables() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    given = parser.parse_args(["--offload-weights", "disk", "--gpu-weight-budget-gib", "40"])
    config = engine_config_from(given, {})
    assert config.offload == OffloadConfig("disk", 40.0)
    environ = {"PDMESH_OFFLOAD_WEIGHTS": "cpu", "PDMESH_GPU_WEIGHT_BUDGET_GIB": "1.5"}
    assert engine_config_from(parser.parse_args([]), environ).offload == OffloadConfig("cpu", 1.5)
    assert not engine_config_from(parser.parse_args([]), {}).offload.enabled
    # Throughput mode: larger batches and prefill passes unless given.
    gpu = engine_config_from(
        parser.parse_args(["--device", "cuda", "--offload-weights", "cpu"]), {}
    )
    assert (gpu.scheduler.max_num_seqs, gpu.scheduler.max_num_batched_tokens) == (512, 8192)
    plain = engine_config_from(parser.parse_args(["--device", "cuda"]), {})
    assert (plain.scheduler.max_num_seqs, plain.scheduler.max_num_batched_tokens) == (256, 2048)
    given = parser.parse_args(
        ["--device", "cuda", "--offload-weights", "cpu", "--max-num-seqs", "8"]
    )
    assert engine_config_from(given, {}).scheduler.max_num_seqs == 8
    with pytest.raises(ValueError, match="offload weights must be one of"):
        engine_config_from(parser.parse_args(["--offload-weights", "nvme"]), {})


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["cpu", "disk"])
def test_cuda_streams_equal_plain(kind: str, tiny_dir: str, tmp_path: Path) -> None:
    """On CUDA the copies run on a side stream behind events: the same tokens as the plain
    engine (eager, so both run the same kernels), with layers resident and streamed."""
    prompts = random_prompts(8, seed=5)
    plain = EngineConfig(model=tiny_dir, device="cuda", dtype="float32", enforce_eager=True)
    expected = [o.token_ids for o in LLM(plain).generate(prompts, GREEDY)]
    config = load_model_config(resolve_model(tiny_dir))
    offload = OffloadConfig(kind, _budget_for(config, 2, 2), 2, disk_dir=str(tmp_path))
    llm = LLM(EngineConfig(model=tiny_dir, device="cuda", dtype="float32", offload=offload))
    assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
    stream = llm.engine.runner.weight_stream
    assert stream is not None and stream.copy_stream is not None
    assert len(stream.layers) == NUM_TINY_LAYERS - 2
