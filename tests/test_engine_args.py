"""Engine flags, their PDMESH_* variables and device-dependent defaults; where `pdmesh up`
places workers and how workers sharing a GPU split its memory."""

from __future__ import annotations

import argparse
import logging

import pytest

from engine.args import add_engine_args, engine_config_from
from engine.config import CacheConfig, EngineConfig, MLFQConfig, auto_dtype
from pdmesh.mesh import MeshConfig, Placement, warn_shared_devices


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    return parser.parse_args(list(argv))


def test_gpu_defaults_batch_256_and_cpu_64() -> None:
    gpu = engine_config_from(parse("--device", "cuda"), {})
    assert gpu.scheduler.max_num_seqs == 256 and gpu.scheduler.max_num_batched_tokens == 2048
    assert gpu.dtype == "bfloat16" and gpu.cache.gpu_memory_utilization == 0.9
    cpu = engine_config_from(parse("--device", "cpu"), {})
    assert cpu.scheduler.max_num_seqs == 64 and cpu.dtype == "float32"


def test_flags_win_over_variables_and_variables_over_defaults() -> None:
    environ = {
        "PDMESH_MAX_NUM_SEQS": "512",
        "PDMESH_GPU_MEMORY_UTILIZATION": "0.5",
        "PDMESH_LOAD_FORMAT": "dummy",
        "PDMESH_ENFORCE_EAGER": "1",
        "PDMESH_NUM_KV_BLOCKS": "77",
    }
    config = engine_config_from(
        parse("--device", "cuda", "--gpu-memory-utilization", "0.4"), environ
    )
    assert config.scheduler.max_num_seqs == 512
    assert config.scheduler.max_num_batched_tokens == 2048
    assert config.cache.gpu_memory_utilization == 0.4 and config.cache.num_blocks == 77
    assert config.load_format == "dummy" and config.enforce_eager
    big = engine_config_from(parse("--device", "cuda", "--max-num-seqs", "4096"), {})
    assert big.scheduler.max_num_batched_tokens == 4096  # a full batch of decodes fits
    with pytest.raises(ValueError, match="PDMESH_MAX_NUM_SEQS='many' is not a int"):
        engine_config_from(parse(), {"PDMESH_MAX_NUM_SEQS": "many"})
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=1.5)


def test_auto_dtype_reads_the_checkpoint_on_gpu(tmp_path: object) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path))
    (folder / "config.json").write_text('{"torch_dtype": "float16"}')
    assert auto_dtype(str(folder), "cuda") == "float16"
    (folder / "config.json").write_text('{"dtype": "float32"}')
    assert auto_dtype(str(folder), "cuda") == "bfloat16"
    assert auto_dtype(str(folder), "cpu") == "float32"
    assert EngineConfig(device="cpu").dtype == "float32"


def test_workers_sharing_a_gpu_split_its_memory(caplog: pytest.LogCaptureFixture) -> None:
    engine = EngineConfig(device="cuda", cache=CacheConfig(gpu_memory_utilization=0.9))
    shared = MeshConfig(engine=engine)
    assert shared.placements() == [Placement(None, 0.45, True), Placement(None, 0.45, True)]
    with caplog.at_level(logging.WARNING):
        warn_shared_devices(shared)
    assert "share GPU" in caplog.text
    apart = MeshConfig(
        engine=engine, num_prefill=2, num_decode=1, prefill_devices=(0,), decode_devices=(1,)
    )
    assert [p.device for p in apart.placements()] == [0, 0, 1]
    assert [p.gpu_memory_utilization for p in apart.placements()] == [0.45, 0.45, 0.9]
    placed = apart.placements()[2]
    assert placed.env() == {"CUDA_VISIBLE_DEVICES": "1"}
    assert placed.engine(engine, 1).cache.gpu_memory_utilization == 0.9
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        warn_shared_devices(apart)
    assert "share GPU" not in caplog.text


def test_scheduling_policy_flag_and_variable() -> None:
    assert engine_config_from(parse(), {}).scheduler.policy == "fcfs"
    environ = {"PDMESH_SCHEDULING_POLICY": "mlfq"}
    assert engine_config_from(parse(), environ).scheduler.policy == "mlfq"
    flagged = engine_config_from(parse("--scheduling-policy", "priority"), environ)
    assert flagged.scheduler.policy == "priority"
    with pytest.raises(SystemExit):
        parse("--scheduling-policy", "lifo")
    with pytest.raises(ValueError, match="scheduling policy must be one of fcfs, priority, mlfq"):
        engine_config_from(parse(), {"PDMESH_SCHEDULING_POLICY": "lifo"})


def test_mlfq_settings_flags_and_variables() -> None:
    assert engine_config_from(parse(), {}).scheduler.mlfq == MLFQConfig()
    environ = {"PDMESH_MLFQ_PROMOTION_PERIOD": "40", "PDMESH_MLFQ_LEVELS": "3"}
    flags = parse(
        "--mlfq-base-quantum", "8", "--mlfq-levels", "2", "--mlfq-join-prompt-tokens", "64"
    )
    mlfq = engine_config_from(flags, environ).scheduler.mlfq
    assert mlfq == MLFQConfig(
        num_levels=2, base_quantum=8, join_prompt_tokens=64, promotion_period=40
    )  # the flag wins over the variable; unset ones keep their defaults
    with pytest.raises(ValueError, match="mlfq base_quantum must be at least 1"):
        engine_config_from(parse("--mlfq-base-quantum", "0"), {})
