"""Staging rows and CUDA IPC carry block bytes exactly; the CUDA tests skip without CUDA."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from kvstore.gpu_paths import (
    PinnedStaging,
    cuda_ipc_available,
    export_cuda_tensor,
    import_cuda_tensor,
)

BLOCK_BYTES = 4096


def _blocks(num_blocks: int, seed: int) -> list[bytes]:
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 256, (num_blocks, BLOCK_BYTES), dtype=torch.uint8, generator=generator)
    return [row.numpy().tobytes() for row in rows]


def _round_trip(device: str) -> None:
    staging = PinnedStaging(BLOCK_BYTES, num_rows=4, device=device)
    first, second = _blocks(3, seed=1), _blocks(4, seed=2)
    on_device = staging.upload(first)
    again = staging.upload(second)  # reuses the rows while the first copy may be in flight
    assert on_device.device.type == device and on_device.shape == (3, BLOCK_BYTES)
    assert staging.download(on_device) == first
    assert staging.download(again) == second


def test_staging_round_trips_blocks_on_the_cpu() -> None:
    _round_trip("cpu")


def test_staging_rejects_bad_shapes() -> None:
    staging = PinnedStaging(BLOCK_BYTES, num_rows=2, device="cpu")
    with pytest.raises(ValueError, match="exceed the 2 staging rows"):
        staging.upload(_blocks(3, seed=0))
    with pytest.raises(ValueError, match="expected 4096"):
        staging.upload([b"short"])
    with pytest.raises(ValueError, match="rows"):
        staging.download(torch.zeros(2, 8, dtype=torch.uint8))


def test_cuda_ipc_refuses_without_cuda_or_on_host_tensors() -> None:
    if cuda_ipc_available():
        with pytest.raises(ValueError, match="only CUDA tensors"):
            export_cuda_tensor(torch.zeros(4))
    else:
        with pytest.raises(RuntimeError, match="CUDA IPC needs CUDA"):
            export_cuda_tensor(torch.zeros(4))


def test_cuda_ipc_handles_of_another_host_are_refused() -> None:
    with pytest.raises(RuntimeError, match="another host"):
        import_cuda_tensor({"host": "elsewhere/boot", "dtype": "uint8", "fields": []})


@pytest.mark.gpu
def test_pinned_staging_round_trips_blocks_on_cuda() -> None:
    staging = PinnedStaging(BLOCK_BYTES, num_rows=4, device="cuda")
    assert staging.is_pinned
    _round_trip("cuda")


def _read_through_ipc(handle: object, results: mp.Queue) -> None:  # type: ignore[type-arg]
    tensor = import_cuda_tensor(handle)  # type: ignore[arg-type]
    assert tensor.dtype == torch.uint8
    results.put(tensor.cpu().numpy().tobytes())


@pytest.mark.gpu
def test_cuda_ipc_maps_another_process_tensor() -> None:
    source = torch.arange(BLOCK_BYTES, device="cuda", dtype=torch.int32).to(torch.uint8)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=_read_through_ipc, args=(export_cuda_tensor(source), results))
    proc.start()
    data = results.get(timeout=120)
    proc.join(60)
    assert proc.exitcode == 0
    assert data == source.cpu().numpy().tobytes()
