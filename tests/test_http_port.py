"""``--http-port``: default 8080, a free port with ``--port 0``, -1 off, the variable below."""

from __future__ import annotations

import pytest

from pdmesh.cli import build_parser
from pdmesh.launch import resolve_http_port


def test_http_port_defaults_and_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PDMESH_HTTP_PORT", raising=False)
    assert resolve_http_port(None, 50051) == 8080
    assert resolve_http_port(None, 0) == 0
    assert resolve_http_port(-1, 50051) is None
    assert resolve_http_port(9090, 0) == 9090
    monkeypatch.setenv("PDMESH_HTTP_PORT", "-1")
    assert resolve_http_port(None, 50051) is None
    with pytest.raises(ValueError, match="HTTP port"):
        resolve_http_port(70000, 50051)


def test_gateway_flags_parse_on_up_and_serve() -> None:
    for argv in (["up"], ["serve", "gateway"]):
        args = build_parser().parse_args([*argv, "--http-port", "8081", "--served-model-name", "m"])
        assert (args.http_port, args.served_model_name) == (8081, "m")
