"""proto <-> dataclass conversions shared by the services (``from_pb`` / ``to_pb``), and the
one converter of sampling parameters between the protos, the command line and the engine."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf.message import Message

from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, TokenLogprob
from pdmesh.v1 import generation_pb2 as gen_pb

FINISH_TO_PB = {
    None: gen_pb.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: gen_pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: gen_pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: gen_pb.FINISH_REASON_ABORT,
    FinishReason.ERROR: gen_pb.FINISH_REASON_ERROR,
}
FINISH_FROM_PB = {v: k for k, v in FINISH_TO_PB.items()}


#: SamplingParams' fields by name: a message or a set of flags carries the ones it shares.
SAMPLING_FIELDS = frozenset(field.name for field in dataclasses.fields(SamplingParams))
_Message = TypeVar("_Message", bound=Message)


def sampling_params(values: Mapping[str, Any]) -> SamplingParams:
    """The one way parameters from outside (a proto, the command line) become SamplingParams:
    the entries named like its fields (a field left out keeps its default); validated there."""
    return SamplingParams(**{name: values[name] for name in SAMPLING_FIELDS & values.keys()})


def sampling_to_pb(params: SamplingParams, message_type: type[_Message]) -> _Message:
    """A message (WorkerSampling, GenerateRequest) with every field it shares with ``params``
    by name; a None leaves an optional field unset."""
    message = message_type()
    for field in message_type.DESCRIPTOR.fields:
        value = getattr(params, field.name) if field.name in SAMPLING_FIELDS else None
        if value is None:
            continue
        if field.is_repeated:
            getattr(message, field.name).extend(value)
        else:
            setattr(message, field.name, value)
    return message


def sampling_from_pb(message: Message) -> SamplingParams:
    """SamplingParams from the fields of ``message`` named like its own; an optional field the
    sender left unset keeps SamplingParams' default."""
    values: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.name not in SAMPLING_FIELDS:
            continue
        if field.is_repeated:
            values[field.name] = tuple(getattr(message, field.name))
        elif not field.has_presence or message.HasField(field.name):
            values[field.name] = getattr(message, field.name)
    return sampling_params(values)


def logprob_to_pb(logprob: TokenLogprob) -> gen_pb.TokenLogprob:
    return gen_pb.TokenLogprob(
        token_id=logprob.token_id,
        logprob=logprob.logprob,
        top=[gen_pb.TopLogprob(token_id=t, logprob=lp) for t, lp in logprob.top],
    )


def logprob_from_pb(message: gen_pb.TokenLogprob) -> TokenLogprob:
    top = tuple((t.token_id, t.logprob) for t in message.top)
    return TokenLogprob(message.token_id, message.logprob, top)
