"""Time to first token through the mesh for a long prompt, cold and again with its prefix
blocks in the cache/store, in one run (CPU, default model, 2 prefill + 2 decode workers).

    python -m bench.prefix_reuse [--store embedded|redis://...] [--repeats 3] [--out x.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from typing import Any

import grpc

from bench.common import environment, write_json
from engine.config import EngineConfig
from pdmesh.mesh import Mesh, MeshConfig
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc


async def first_token_ms(stub: Any, prompt: str) -> tuple[float, int, list[int]]:
    request = gen_pb.GenerateRequest(prompt=prompt, max_tokens=8, temperature=0)
    ids: list[int] = []
    last = gen_pb.GenerateResponse()
    async for piece in stub.Generate(request):
        ids += piece.token_ids
        last = piece
    return last.timings.time_to_first_token_ms, last.usage.cached_tokens, ids


async def run(store: str, repeats: int) -> dict[str, Any]:
    mesh = Mesh(
        MeshConfig(
            engine=EngineConfig(device="cpu"),
            gateway_port=0,
            num_prefill=2,
            num_decode=2,
            store=store,
        )
    )
    await mesh.start()
    try:
        async with grpc.aio.insecure_channel(mesh.gateway_address) as channel:
            stub = gen_grpc.GenerationStub(channel)
            rows = []
            for index in range(repeats):
                prompt = (
                    f"Document {index}: "
                    + " ".join(
                        f"clause {index}.{i} binds party {i % 5} to term {i}" for i in range(120)
                    )
                    + "\nSummary:"
                )
                cold, cold_cached, cold_ids = await first_token_ms(stub, prompt)
                warm, warm_cached, warm_ids = await first_token_ms(stub, prompt)
                assert warm_ids == cold_ids and cold_cached == 0 and warm_cached > 0
                rows.append(
                    {"cold_ttft_ms": cold, "cached_ttft_ms": warm, "cached_tokens": warm_cached}
                )
                print(
                    f"prompt {index}: cold {cold:.0f} ms, cached {warm:.0f} ms "
                    f"({warm_cached} tokens from cache)"
                )
    finally:
        await mesh.stop()
    cold_median = statistics.median(r["cold_ttft_ms"] for r in rows)
    warm_median = statistics.median(r["cached_ttft_ms"] for r in rows)
    print(
        f"median TTFT cold {cold_median:.0f} ms, cached {warm_median:.0f} ms: "
        f"{cold_median / warm_median:.1f}x faster"
    )
    return {"store": store, "rows": rows, "speedup": cold_median / warm_median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", default="embedded")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out")
    args = parser.parse_args()
    result = asyncio.run(run(args.store, args.repeats))
    write_json(args.out, {**environment(), **result})


if __name__ == "__main__":
    main()
