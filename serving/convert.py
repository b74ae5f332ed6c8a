"""proto <-> dataclass conversions shared by the servicers (``from_pb`` / ``to_pb``)."""

from __future__ import annotations

from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, TokenLogprob
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import worker_pb2 as worker_pb

FINISH_TO_PB = {
    None: gen_pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: gen_pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: gen_pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: gen_pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: gen_pb.FINISH_REASON_ERROR,
}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}


def sampling_to_pb(params: SamplingParams) -> worker_pb.WorkerSampling:
    message = worker_pb.WorkerSampling(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        stop_token_ids=list(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        message.seed = params.seed
    if params.logprobs is not None:
        message.logprobs = params.logprobs
    return message


def sampling_from_pb(message: worker_pb.WorkerSampling) -> SamplingParams:
    return SamplingParams(
        max_tokens=message.max_tokens,
        temperature=message.temperature,
        top_p=message.top_p,
        top_k=message.top_k,
        min_p=message.min_p,
        repetition_penalty=message.repetition_penalty,
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        seed=message.seed if message.HasField("seed") else None,
        stop_token_ids=tuple(message.stop_token_ids),
        ignore_eos=message.ignore_eos,
        logprobs=message.logprobs if message.HasField("logprobs") else None,
    )


def logprob_to_pb(logprob: TokenLogprob) -> gen_pb.TokenLogprob:
    return gen_pb.TokenLogprob(
        token_id=logprob.token_id,
        logprob=logprob.logprob,
        top=[gen_pb.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top],
    )


def logprob_from_pb(message: gen_pb.TokenLogprob) -> TokenLogprob:
    top = tuple((t.token_id, t.logprob) for t in message.top)
    return TokenLogprob(message.token_id, message.logprob, top)
