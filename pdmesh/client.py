"""A streaming command-line client of the gateway."""

from __future__ import annotations

import sys

import grpc

from engine.sampling_params import SamplingParams
from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc
from serving.convert import sampling_to_pb
from serving.security import ClientSecurity


def request_from(prompt: str, chat: bool, params: SamplingParams) -> gen_pb.GenerateRequest:
    request = sampling_to_pb(params, gen_pb.GenerateRequest)
    if chat:
        request.messages.append(gen_pb.ChatMessage(role="user", content=prompt))
    else:
        request.prompt = prompt
    return request


def stream_generate(
    target: str,
    prompt: str,
    chat: bool,
    params: SamplingParams,
    security: ClientSecurity | None = None,
) -> int:
    security = security or ClientSecurity()
    with security.channel(target) as channel:
        stub = gen_grpc.GenerationStub(channel)
        request = request_from(prompt, chat, params)
        try:
            for piece in stub.Generate(request, metadata=security.metadata()):
                sys.stdout.write(piece.text)
                sys.stdout.flush()
                if piece.HasField("usage"):
                    usage, timings = piece.usage, piece.timings
                    sys.stdout.write("\n")
                    print(
                        f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion "
                        f"tokens, {usage.cached_tokens} cached; TTFT "
                        f"{timings.time_to_first_token_ms:.0f} ms, "
                        f"{timings.mean_time_per_output_token_ms:.1f} ms/token]",
                        file=sys.stderr,
                    )
        except grpc.RpcError as error:
            print(f"pdmesh: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0
