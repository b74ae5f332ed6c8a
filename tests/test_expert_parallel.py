"""Expert parallelism on the CPU with gloo: MoE layers with their experts split over 2 ranks
(EP = TP = 2), or every expert sharded over both (EP = 1, TP = 2), produce the same greedy
tokens as one rank; dense layers stay tensor-parallel."""

from __future__ import annotations

import argparse
from collections.abc import Iterator

import pytest

from engine.args import add_engine_args, engine_config_from
from engine.config import CacheConfig, EngineConfig
from engine.llm import LLM
from engine.sampling_params import SamplingParams
from tests.test_tiny_models import random_prompts
from tests.tiny_models import save_tiny_model

GREEDY = SamplingParams(max_tokens=16, temperature=0)


def sharded(config: EngineConfig) -> Iterator[LLM]:
    llm = LLM(config)
    try:
        yield llm
    finally:
        llm.engine.shutdown()


@pytest.mark.parametrize(
    ("kind", "ep"),
    [
        ("mixtral", 2),  # 2 of 4 experts per rank
        ("mixtral", 1),  # all experts on both ranks, each expert's intermediate split
        ("qwen2_moe", 2),  # + the shared expert (tensor-parallel) and a dense layer
        ("qwen3_moe", 2),
    ],
)
def test_moe_ep_and_tp2_equal_one_rank(
    kind: str, ep: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    directory = str(save_tiny_model(kind, tmp_path_factory.mktemp(kind)))
    prompts = random_prompts(4, seed=ep)
    cache = CacheConfig(block_size=8)
    expected = LLM(EngineConfig(model=directory, device="cpu", cache=cache)).generate(
        prompts, GREEDY
    )
    for llm in sharded(
        EngineConfig(
            model=directory,
            device="cpu",
            cache=cache,
            tensor_parallel_size=2,
            expert_parallel_size=ep,
        )
    ):
        got = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]


def test_ep_flag_and_validation() -> None:
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config_from(parser.parse_args(["--tp", "4", "--ep", "2"]), environ={})
    assert config.expert_parallel_size == 2
    from_env = engine_config_from(parser.parse_args(["--tp", "2"]), environ={"PDMESH_EP": "1"})
    assert from_env.expert_parallel_size == 1
    assert engine_config_from(parser.parse_args([]), environ={}).expert_parallel_size is None
    with pytest.raises(ValueError, match="must divide"):
        EngineConfig(device="cpu", tensor_parallel_size=2, expert_parallel_size=3)
