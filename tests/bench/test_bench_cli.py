"""``pdmesh bench batch`` on the default model, and the small decisions of the bench CLI."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pdmesh.bench.batch import is_oom
from pdmesh.bench.sweep import layout
from pdmesh.cli import build_parser, main
from pdmesh.launch import resolve_metrics_port
from pdmesh.mesh import service_metrics_port

ROOT = Path(__file__).resolve().parents[2]


def test_bench_batch_reports_ms_per_token_per_batch(tmp_path: Path) -> None:
    out = tmp_path / "batch.json"
    argv = ["bench", "batch", "--device", "cpu", "--batch-sizes", "1", "3",
            "--input-len", "4", "--new-tokens", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["load_s"] > 0 and result["model"].endswith(".gguf")
    assert [row["batch"] for row in result["results"]] == [1, 3]
    for row in result["results"]:
        assert not row["oom"] and row["fits_kv_cache"]
        # ms per token is wall time over every generated token of the batch.
        expected = row["wall_s"] * 1e3 / (row["batch"] * 2)
        assert row["ms_per_token"] == pytest.approx(expected)


def test_out_of_memory_is_recognised() -> None:
    assert is_oom(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_oom(RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate: out of memory"))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))


def test_sweep_layouts_use_the_same_workers() -> None:
    args = argparse.Namespace(workers=2, prefill=None)
    assert layout(args, "colocated") == (2, 0)
    assert layout(args, "disaggregated") == (1, 1)
    assert layout(argparse.Namespace(workers=5, prefill=3), "disaggregated") == (3, 2)
    with pytest.raises(ValueError):
        layout(argparse.Namespace(workers=2, prefill=2), "disaggregated")


def test_metrics_ports_default_to_8000_or_free_and_minus_one_is_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PDMESH_METRICS_PORT", raising=False)
    assert resolve_metrics_port(None, 50051) == 8000
    assert resolve_metrics_port(None, 0) == 0  # tests and --port 0: free ports
    assert resolve_metrics_port(-1, 50051) is None
    assert resolve_metrics_port(9100, 50051) == 9100
    monkeypatch.setenv("PDMESH_METRICS_PORT", "-1")
    assert resolve_metrics_port(None, 50051) is None
    with pytest.raises(ValueError):
        resolve_metrics_port(70000, 50051)
    assert [service_metrics_port(8000, i) for i in range(3)] == [8000, 8001, 8002]
    assert service_metrics_port(0, 2) == 0 and service_metrics_port(None, 1) is None
    args = build_parser().parse_args(["up", "--metrics-port", "9000", "--log-format", "json"])
    assert args.metrics_port == 9000 and args.log_format == "json"


def test_ghz_script_explains_how_to_install_ghz_when_missing(tmp_path: Path) -> None:
    # A PATH holding only what the script needs before it looks for ghz, so ghz is missing
    # even on a host that has it.
    for tool in ("dirname", "cat"):
        (tmp_path / tool).symlink_to(shutil.which(tool) or f"/usr/bin/{tool}")
    run = subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(ROOT / "bench/ghz/run.sh")],
        env={"PATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 127
    assert "go install github.com/bojand/ghz/cmd/ghz@latest" in run.stderr


def test_results_record_the_mesh_layout_without_secrets() -> None:
    import json

    from pdmesh.bench.meshes import recorded_config
    from pdmesh.mesh import MeshConfig
    from serving.security import SecurityConfig

    secret = "a-mesh-secret-of-forty-characters-012345"
    config = MeshConfig(
        security=SecurityConfig(api_keys=frozenset({"sk-key-0123456789"}), mesh_secret=secret)
    )
    written = json.dumps(recorded_config(config))  # serializable: frozensets are gone
    assert "security" not in written and secret not in written and "sk-key" not in written
    assert json.loads(written)["num_prefill"] == 1
