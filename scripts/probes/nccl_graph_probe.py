"""Can this host capture a NCCL all-reduce inside a CUDA graph and replay it? Two ranks, one
all-reduce of a decode-sized activation (64 x 4096 bf16), eager vs graph-replayed time.

    timeout 120 python -m scripts.probes.nccl_graph_probe
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank_main(rank: int, world: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank)
    )
    x = torch.ones(64, 4096, dtype=torch.bfloat16, device="cuda")
    dist.all_reduce(x)  # initializes the communicator outside any capture
    torch.cuda.synchronize()
    print(f"rank {rank}: warm-up done", flush=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            dist.all_reduce(x)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(64):
            x.mul_(0.5)
            dist.all_reduce(x)
    print(f"rank {rank}: captured", flush=True)
    x.fill_(1.0)
    graph.replay()
    torch.cuda.synchronize()
    print(f"rank {rank}: replayed, x = {x[0, 0].item()} (expect {1.0})", flush=True)
    for label, fn in (
        ("graph", graph.replay),
        ("eager", lambda: [dist.all_reduce(x) for _ in range(64)]),
    ):
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - start) / 20 * 1e3
        print(f"rank {rank}: 64 all-reduces ({label}): {ms:.3f} ms", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(rank_main, args=(2,), nprocs=2)
