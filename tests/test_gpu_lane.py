"""The device lane on CUDA: an arena mapped by another process through the JSON IPC handle
sees the writer's rows (and the writer the reader's writes), and a hand-off between two
engines on the GPU goes through the lane by default, token-identical to one engine."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing as mp
from typing import Any

import pytest
import torch

from engine.config import CacheConfig, EngineConfig, SchedulerConfig
from engine.engine import Engine
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from kvstore.device_lane import DeviceArena
from kvstore.embedded import EmbeddedKVStore
from kvstore.gpu_paths import export_cuda_tensor, import_cuda_tensor
from tests.tiny_models import save_tiny_model

pytestmark = pytest.mark.gpu


def _reader(handle_json: str, queue: Any) -> None:
    rows = import_cuda_tensor(json.loads(handle_json))
    queue.put(rows.cpu().tolist())
    rows[1].fill_(7)  # the writer sees this: one memory
    torch.cuda.synchronize()
    queue.put("written")


def test_another_process_maps_the_arena_through_the_json_handle() -> None:
    arena = DeviceArena(block_bytes=16, num_rows=3, device="cuda")
    arena.rows.copy_(torch.arange(48, dtype=torch.uint8).view(3, 16))
    torch.cuda.synchronize()
    context = mp.get_context("spawn")
    queue = context.Queue()
    handle = json.dumps(export_cuda_tensor(arena.rows))  # what RedisLaneIndex stores
    process = context.Process(target=_reader, args=(handle, queue))
    process.start()
    try:
        assert queue.get(timeout=120) == arena.rows.cpu().tolist()
        assert queue.get(timeout=60) == "written"
    finally:
        process.join(timeout=60)
    assert process.exitcode == 0
    assert arena.rows[1].cpu().tolist() == [7] * 16
    assert arena.rows[0].cpu().tolist() == list(range(16))


def test_gpu_hand_off_goes_through_the_lane(tmp_path: Any) -> None:
    model_dir = str(save_tiny_model("llama3", tmp_path))
    config = EngineConfig(
        model=model_dir,
        device="cuda",
        cache=CacheConfig(block_size=16, num_blocks=64),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64),
    )
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompt = [(5 * i + 1) % 500 for i in range(150)]
    expected = LLM(config).generate([prompt], params)[0].token_ids
    store = EmbeddedKVStore(256)
    prefill = Engine(config, store, publish_kv=True)
    decode = Engine(config, store)
    assert prefill.kv is not None and prefill.kv.lane is not None, "on by default on CUDA"
    prefill.add_request(prompt, dataclasses.replace(params, max_tokens=1), "r")
    decode.prefetch(prompt, params, "r")
    first = None
    while first is None:
        first = next((o for o in prefill.step() if o.finish_reason is not None), None)
        decode.step()
    assert first.kv_hashes is not None
    decode.resume("r", first.new_token_ids[0], first.kv_hashes)
    tokens = list(first.new_token_ids)
    while decode.has_unfinished:
        for output in decode.step():
            tokens += output.new_token_ids
    assert tokens == expected
    assert decode.kv is not None and decode.kv.lane is not None
    assert decode.kv.lane.num_filled_blocks == 10, "every block of the prompt, device to device"
    # The finished request's blocks went to the store from the host publisher's thread; a
    # fresh prefill worker imports them and continues as one engine would.
    assert decode.kv.publisher is not None, "on by default on CUDA"
    decode.kv.publisher.flush()
    assert decode.kv.num_retained_blocks > 0
    follow = [*prompt, *tokens, 7, 8, 9]
    fresh = Engine(config, store, publish_kv=True)
    fresh.add_request(follow, dataclasses.replace(params, max_tokens=1), "next")
    reply = None
    while reply is None:
        reply = next((o for o in fresh.step() if o.finish_reason is not None), None)
    assert reply.num_cached_tokens >= len(prompt) // 16 * 16
    one = dataclasses.replace(params, max_tokens=1)
    assert reply.new_token_ids == LLM(config).generate([follow], one)[0].token_ids
    store.release("next")
    assert store.stats().num_pinned_blocks == 0
