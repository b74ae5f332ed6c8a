"""One converter of sampling parameters: proto messages, command-line flags, SamplingParams."""

from __future__ import annotations

import pytest

from engine.sampling_params import SamplingParams
from pdmesh.cli import build_parser, sampling_params_from
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import worker_pb2 as worker_pb
from serving.convert import sampling_from_pb, sampling_params, sampling_to_pb

FULL = SamplingParams(
    max_tokens=7,
    temperature=0.5,
    top_p=0.75,
    top_k=3,
    min_p=0.25,
    repetition_penalty=1.5,
    presence_penalty=0.5,
    frequency_penalty=-0.5,
    seed=11,
    stop=("END",),
    stop_token_ids=(2, 5),
    ignore_eos=True,
    logprobs=2,
)


def test_worker_sampling_round_trips_every_field_it_carries() -> None:
    message = sampling_to_pb(FULL, worker_pb.WorkerSampling)
    assert message.seed == 11 and message.logprobs == 2 and list(message.stop_token_ids) == [2, 5]
    # Stop strings stay at the gateway: the worker message has no field for them.
    assert sampling_from_pb(message) == SamplingParams(**{**FULL.__dict__, "stop": ()})


def test_generate_request_round_trips_and_unset_fields_keep_the_defaults() -> None:
    assert sampling_from_pb(sampling_to_pb(FULL, gen_pb.GenerateRequest)) == FULL
    assert sampling_from_pb(gen_pb.GenerateRequest(prompt="hi")) == SamplingParams()
    unset = sampling_to_pb(SamplingParams(), gen_pb.GenerateRequest)
    assert not unset.HasField("seed") and not unset.HasField("logprobs")


def test_worker_fields_without_presence_are_taken_as_sent() -> None:
    message = worker_pb.WorkerSampling(max_tokens=3, top_p=1.0, repetition_penalty=1.0)
    params = sampling_from_pb(message)
    assert (params.max_tokens, params.temperature, params.seed) == (3, 0.0, None)


def test_cli_flags_become_sampling_params_and_bad_values_are_refused() -> None:
    args = build_parser().parse_args(
        ["generate", "hi", "--max-tokens", "9", "--seed", "4", "--stop", "x", "--ignore-eos"]
    )
    assert sampling_params_from(args) == SamplingParams(
        max_tokens=9, temperature=0.0, seed=4, stop=("x",), ignore_eos=True
    )
    with pytest.raises(ValueError, match="top_p"):
        sampling_params({"top_p": 2.0, "not_a_field": 1})
