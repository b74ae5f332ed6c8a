"""TLS on the public port and mutual TLS between services, end to end: `pdmesh up --colocated`
as a separate process with throwaway CAs (made by `openssl`), an API key and a configured mesh
secret; Python, the `pdmesh generate` CLI and grpcurl as clients. Two CAs: one signs the
gateway's public certificate, the other the mesh certificate every service presents."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdmesh.v1 import generation_pb2 as gen_pb
from pdmesh.v1 import generation_pb2_grpc as gen_grpc
from pdmesh.v1 import worker_pb2 as worker_pb
from pdmesh.v1 import worker_pb2_grpc as worker_grpc
from serving.auth import bearer_metadata
from tests.mesh.certs import Issued, issue, make_ca
from tests.mesh.test_grpcurl import find_grpcurl, json_stream

API_KEY = "sk-tls-test-0123456789"
MESH_SECRET = "mesh-secret-for-the-tls-test-0123456789"
PROMPT = gen_pb.GenerateRequest(prompt="The capital of France is", max_tokens=4, temperature=0)
START_TIMEOUT_S = 300
#: A failed TLS handshake surfaces as UNAVAILABLE once this deadline passes.
HANDSHAKE_TIMEOUT_S = 10


@dataclass(frozen=True)
class Certificates:
    public: Issued  # the gateway's public port
    mesh: Issued  # every service, between each other
    #: The root a client of the public port trusts.
    public_ca: Path


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("certs")
    public_ca = make_ca(directory, "public-ca")
    mesh_ca = make_ca(directory, "mesh-ca")
    return Certificates(
        public=issue(directory, "gateway", public_ca),
        mesh=issue(directory, "mesh", mesh_ca),
        public_ca=public_ca[0],
    )


class Up:
    """`pdmesh up` in its own process; its output (stdout and stderr) collected in a thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pdmesh.cli", "up", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            assert self.process.poll() is None, "pdmesh up exited:\n" + "".join(self.lines)
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}:\n{''.join(self.lines)}")

    @property
    def output(self) -> str:
        return "".join(self.lines)


@dataclass(frozen=True)
class Running:
    up: Up
    gateway: str
    worker: str


@pytest.fixture(scope="module")
def mesh(certificates: Certificates, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    secret_file = tmp_path_factory.mktemp("secret") / "mesh-secret"
    secret_file.write_text(MESH_SECRET + "\n")
    public, mesh_cert = certificates.public, certificates.mesh
    env = {
        **os.environ,
        "PDMESH_API_KEYS": API_KEY,
        "PDMESH_MESH_SECRET_FILE": str(secret_file),
        "PDMESH_MESH_TLS_CA": str(mesh_cert.ca),  # one through the environment
    }
    env.pop("PDMESH_MESH_SECRET", None)
    args = ["--device", "cpu", "--port", "0", "--colocated"]
    args += ["--tls-cert", str(public.cert), "--tls-key", str(public.key)]
    args += ["--mesh-tls-cert", str(mesh_cert.cert), "--mesh-tls-key", str(mesh_cert.key)]
    up = Up(args, env)
    try:
        worker = up.wait_for(r"colocated worker on (\S+)").group(1)
        gateway = up.wait_for(r"gateway listening on (\S+)").group(1)
        yield Running(up, gateway, worker)
    finally:
        if up.process.poll() is None:
            up.process.kill()
        up.process.wait(timeout=30)


def public_channel(mesh: Running, root: Path) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(root_certificates=root.read_bytes())
    return grpc.secure_channel(mesh.gateway, credentials)


def mesh_channel(mesh: Running, root: Path, client: Issued | None) -> grpc.Channel:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=root.read_bytes(),
        private_key=client.key.read_bytes() if client else None,
        certificate_chain=client.cert.read_bytes() if client else None,
    )
    return grpc.secure_channel(mesh.worker, credentials)


def test_startup_reports_protection_without_secrets(mesh: Running) -> None:
    line = mesh.up.wait_for(r"pdmesh: gateway: .*; workers: .*").group(0)
    assert "1 API key(s) required, TLS" in line
    assert "mesh secret configured, mutual TLS" in line


def test_generate_over_tls(mesh: Running, certificates: Certificates) -> None:
    """Client → TLS gateway → mutual TLS + mesh secret → colocated worker, and back."""
    with public_channel(mesh, certificates.public_ca) as channel:
        stub = gen_grpc.GenerationStub(channel)
        metadata = bearer_metadata(API_KEY)
        reply = stub.GenerateUnary(PROMPT, metadata=metadata, timeout=120)
        assert "Paris" in reply.text and reply.usage.completion_tokens == 4
        streamed = "".join(p.text for p in stub.Generate(PROMPT, metadata=metadata, timeout=120))
        assert streamed == reply.text
        with pytest.raises(grpc.RpcError) as info:
            stub.GenerateUnary(PROMPT, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="pdmesh.v1.Generation"), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING, "open, over TLS"


def unavailable(call: Any) -> bool:
    try:
        call()
    except grpc.RpcError as error:
        return bool(error.code() == grpc.StatusCode.UNAVAILABLE)
    return False


def test_public_port_refuses_plaintext_and_untrusted_clients(
    mesh: Running, certificates: Certificates
) -> None:
    def model_info(channel: grpc.Channel) -> Any:
        stub = gen_grpc.GenerationStub(channel)
        return lambda: stub.ModelInfo(
            gen_pb.ModelInfoRequest(),
            metadata=bearer_metadata(API_KEY),
            timeout=HANDSHAKE_TIMEOUT_S,
        )

    with grpc.insecure_channel(mesh.gateway) as channel:
        assert unavailable(model_info(channel)), "plaintext against a TLS port"
    with public_channel(mesh, certificates.mesh.ca) as channel:
        assert unavailable(model_info(channel)), "a client that does not trust the gateway's CA"
    with public_channel(mesh, certificates.public_ca) as channel:
        assert model_info(channel)().max_model_len > 0


def test_cli_generate_over_tls(mesh: Running, certificates: Certificates) -> None:
    env = {**os.environ, "PDMESH_API_KEY": API_KEY}
    command = [sys.executable, "-m", "pdmesh.cli", "generate", "The capital of France is"]
    command += ["--target", mesh.gateway, "--tls-ca", str(certificates.public_ca)]
    command += ["--max-tokens", "4"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_worker_requires_client_certificate_and_secret(
    mesh: Running, certificates: Certificates
) -> None:
    """Only a peer with a mesh-CA certificate AND the mesh secret gets through."""
    mesh_cert = certificates.mesh
    secret = bearer_metadata(MESH_SECRET)

    def load(channel: grpc.Channel, metadata: Any) -> Any:
        stub = worker_grpc.ColocatedWorkerStub(channel)
        return lambda: stub.Load(
            worker_pb.LoadRequest(), metadata=metadata, timeout=HANDSHAKE_TIMEOUT_S
        )

    with grpc.insecure_channel(mesh.worker) as channel:
        assert unavailable(load(channel, secret)), "plaintext"
    with mesh_channel(mesh, mesh_cert.ca, None) as channel:
        assert unavailable(load(channel, secret)), "no client certificate"
    with mesh_channel(mesh, mesh_cert.ca, certificates.public) as channel:
        assert unavailable(load(channel, secret)), "a certificate from another CA"
    with mesh_channel(mesh, mesh_cert.ca, mesh_cert) as channel:
        with pytest.raises(grpc.RpcError) as info:
            load(channel, ())()
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, "certificate, no secret"
        assert load(channel, secret)().num_free_blocks > 0


def test_grpcurl_over_tls_and_mutual_tls(mesh: Running, certificates: Certificates) -> None:
    grpcurl = find_grpcurl()
    if grpcurl is None:
        pytest.fail("grpcurl not found: see tests/mesh/test_grpcurl.py")
    data = '{"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}'
    public = [grpcurl, "-cacert", str(certificates.public_ca), "-d", data]
    public += ["-H", f"authorization: Bearer {API_KEY}"]
    public += [mesh.gateway, "pdmesh.v1.Generation/GenerateUnary"]
    result = subprocess.run(public, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Paris" in json_stream(result.stdout)[0]["text"]
    mesh_cert = certificates.mesh
    internal = [grpcurl, "-cacert", str(mesh_cert.ca), "-d", "{}"]
    internal += ["-H", f"authorization: Bearer {MESH_SECRET}"]
    client = ["-cert", str(mesh_cert.cert), "-key", str(mesh_cert.key)]
    target = [mesh.worker, "pdmesh.v1.ColocatedWorker/Load"]
    result = subprocess.run(
        [*internal, *client, *target], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "numFreeBlocks" in result.stdout or "num_free_blocks" in result.stdout
    # A refused handshake makes grpcurl retry until its connect timeout (10 s by default).
    fast = ["-connect-timeout", "3"]
    result = subprocess.run([*internal, *fast, *target], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0, "no client certificate"


def test_stops_cleanly_and_never_printed_a_secret(mesh: Running) -> None:
    """Last in the file: stops `pdmesh up` and reads everything it ever printed, including
    the warnings about the refused calls above."""
    mesh.up.process.send_signal(signal.SIGINT)
    assert mesh.up.process.wait(timeout=60) == 0
    mesh.up.reader.join(timeout=10)
    output = mesh.up.output
    assert "refused /pdmesh.v1.Generation/GenerateUnary" in output
    assert "refused /pdmesh.v1.ColocatedWorker/Load" in output
    for secret in (API_KEY, MESH_SECRET):
        assert secret not in output
