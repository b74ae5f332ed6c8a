"""What crosses between an engine core process and the service that drives it.

Commands go in (one msgpack frame each, batched by the sender when it has several); one
``StepBatch`` comes out per engine step with every request's new tokens, so the cost per step
is one message, not one per request per token. Same-host IPC only: protos cross the network.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, TokenLogprob


class Add(msgspec.Struct, tag=True, array_like=True):
    """Queue a request. ``prefetch`` (decode role): reserve blocks and pull the prompt's KV
    as it is published, then wait for ``Resume``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    output_token_ids: list[int] | None = None
    kv_import: list[bytes] | None = None
    prefetch: bool = False
    #: Scheduling priority (lower runs first) under the ``priority`` policy.
    priority: int = 0


class Resume(msgspec.Struct, tag=True, array_like=True):
    """Continue a prefetched request after its first token."""

    request_id: str
    first_token_id: int
    kv_hashes: list[bytes]


class Abort(msgspec.Struct, tag=True, array_like=True):
    """End a request. ``abandoned``: its caller left, so pins it took for a successor (a
    prefill's published prompt) go too, even when it has finished."""

    request_id: str
    abandoned: bool = False


class Drain(msgspec.Struct, tag=True, array_like=True):
    """Refuse new requests from now on (the worker is going out of service), or, with
    ``draining`` False, take them again."""

    draining: bool = True


class Stop(msgspec.Struct, tag=True, array_like=True):
    """Shut the engine down and exit."""


Command = Add | Resume | Abort | Drain | Stop


@dataclass(frozen=True)
class LoadStats:
    """A worker's load, for routing, health and tests that count blocks."""

    num_running: int = 0
    num_waiting: int = 0
    outstanding_prefill_tokens: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_used_blocks: int = 0
    num_retained_blocks: int = 0
    num_prefetched_blocks: int = 0
    num_loaded_blocks: int = 0


class RequestOutput(msgspec.Struct, array_like=True):
    """What one step produced for one request (a diff); ``error`` ends it with a domain
    error: (exception class name, message)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_cached_tokens: int
    #: Prefill role, on the request's end: store names of the prompt's blocks.
    kv_hashes: list[bytes] | None = None
    error: tuple[str, str] | None = None


class StepBatch(msgspec.Struct, tag=True, array_like=True):
    """One engine step's outputs for every request, plus the engine's load after it."""

    outputs: list[RequestOutput]
    load: LoadStats
    #: Sequences in the step and its prompt chunks' sizes (worker metrics).
    num_seqs: int = 0
    prefill_chunk_tokens: list[int] = msgspec.field(default_factory=list)
    #: Set when the engine can no longer serve (a rank died, a collective failed).
    lost: str | None = None
    #: The core's own metrics (store traffic) in Prometheus text format, now and then.
    metrics: str | None = None


@dataclass(frozen=True)
class EngineInfo:
    """Sent once the engine is loaded: what the service needs to know of it."""

    namespace: str
    block_size: int
    num_blocks: int
    vocab_size: int
    max_model_len: int
    transfer_path: str
    device: str
    #: The tensor-parallel follower processes (ranks 1..N-1) the core started.
    rank_pids: list[int] = field(default_factory=list)
    #: Where the model was loaded from (a directory or a .gguf file), and its dtype.
    model_path: str = ""
    dtype: str = ""
    #: The scheduler's policy (fcfs, priority, mlfq).
    scheduling_policy: str = "fcfs"


class Ready(msgspec.Struct, tag=True, array_like=True):
    info: EngineInfo | None = None
    #: Start-up failed: (exception class name, message).
    error: tuple[str, str] | None = None


Event = StepBatch | Ready


class Codec:
    """msgpack encoder and typed decoders for both directions (built once per process)."""

    def __init__(self) -> None:
        self.encoder = msgspec.msgpack.Encoder()
        self.commands: msgspec.msgpack.Decoder[Command] = msgspec.msgpack.Decoder(Command)  # type: ignore[arg-type]
        self.events: msgspec.msgpack.Decoder[Event] = msgspec.msgpack.Decoder(Event)  # type: ignore[arg-type]
