"""SecurityConfig: built from flags, files and PDMESH_* variables, validated at construction,
and never showing a secret (repr, error messages, `pdmesh serve` refusing to start)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdmesh.cli import build_parser, main
from pdmesh.security_args import client_security_from, security_config_from
from serving.security import ClientSecurity, SecurityConfig, security_from

SECRET = "mesh-secret-0123456789abcdef"


def test_keys_come_from_flags_env_and_file(tmp_path: Path) -> None:
    key_file = tmp_path / "keys"
    key_file.write_text("# operators\nfile-key-1\n\n  file-key-2  \n")
    env = {"PDMESH_API_KEYS": "env-key-1, env-key-2,", "PDMESH_MESH_SECRET": SECRET}
    config = security_from(api_keys=["flag-key"], api_key_file=str(key_file), env=env)
    assert config.api_keys == {"flag-key", "env-key-1", "env-key-2", "file-key-1", "file-key-2"}
    assert config.mesh_secret == SECRET


def test_secret_and_key_files_from_env(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET + "\n")
    (tmp_path / "keys").write_text("k1\n")
    env = {
        "PDMESH_MESH_SECRET_FILE": str(tmp_path / "secret"),
        "PDMESH_API_KEY_FILE": str(tmp_path / "keys"),
    }
    config = security_from(env=env)
    assert config.mesh_secret == SECRET and config.api_keys == {"k1"}


def test_no_configuration_means_open_api_and_no_secret() -> None:
    config = security_from(env={})
    assert config == SecurityConfig()
    assert not config.api_keys and config.mesh_secret is None
    assert not config.is_public_tls and not config.is_mesh_tls


def test_secret_given_twice_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text(SECRET)
    with pytest.raises(ValueError, match="give the mesh secret once"):
        security_from(mesh_secret_file=str(tmp_path / "secret"), env={"PDMESH_MESH_SECRET": SECRET})


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"mesh_secret": "short-secret"}, "at least 16"),
        ({"mesh_secret": "a mesh secret with spaces"}, "printable ASCII without spaces"),
        ({"mesh_secret": "sécret-sécret-sécret"}, "printable ASCII without spaces"),
        ({"api_keys": frozenset({""})}, "an API key is empty"),
        ({"api_keys": frozenset({"key\twith-tab"})}, "printable ASCII without spaces"),
        ({"api_keys": {"a-set-not-frozen"}}, "frozenset"),
        ({"tls_cert": Path("/etc/hostname")}, "both a certificate and a key"),
        ({"mesh_tls_cert": Path("/etc/hostname")}, "together"),
        ({"tls_cert": Path("/no/cert.pem"), "tls_key": Path("/no/key.pem")}, "no such file"),
    ],
)
def test_bad_configs_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        SecurityConfig(**fields)  # type: ignore[arg-type]
    for value in fields.values():  # errors name the problem, never the secret
        if isinstance(value, str):
            assert value not in str(info.value)


def test_repr_shows_no_secret() -> None:
    config = SecurityConfig(api_keys=frozenset({"api-key-0123456789"}), mesh_secret=SECRET)
    assert "api-key-0123456789" not in repr(config) and SECRET not in repr(config)


def test_generated_mesh_secret_is_random_and_kept_when_set() -> None:
    first, second = SecurityConfig().with_mesh_secret(), SecurityConfig().with_mesh_secret()
    assert first.mesh_secret and second.mesh_secret and first.mesh_secret != second.mesh_secret
    assert len(first.mesh_secret) >= 32
    configured = SecurityConfig(mesh_secret=SECRET)
    assert configured.with_mesh_secret() is configured


def test_cli_flags_build_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PDMESH_API_KEYS", "PDMESH_MESH_SECRET", "PDMESH_API_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "secret").write_text(SECRET)
    flags = ["--api-key", "k1", "--api-key", "k2", "--mesh-secret-file", str(tmp_path / "secret")]
    args = build_parser().parse_args(["up", *flags])
    config = security_config_from(args)
    assert config.api_keys == {"k1", "k2"} and config.mesh_secret == SECRET
    assert args.worker_host == "127.0.0.1", "internal services on loopback by default"


def test_client_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDMESH_API_KEY", "env-key")
    monkeypatch.delenv("PDMESH_TLS_CA", raising=False)
    args = build_parser().parse_args(["generate", "hi", "--target", "127.0.0.1:1"])
    assert client_security_from(args) == ClientSecurity(api_key="env-key")
    assert client_security_from(args).metadata() == (("authorization", "Bearer env-key"),)
    ca = tmp_path / "ca.pem"
    ca.write_text("not read until connecting")
    args = build_parser().parse_args(
        ["generate", "hi", "--target", "h:1", "--api-key", "flag-key", "--tls-ca", str(ca)]
    )
    assert client_security_from(args) == ClientSecurity("flag-key", True, str(ca))
    with pytest.raises(ValueError, match="no such file"):
        ClientSecurity(is_tls=True, tls_ca=str(tmp_path / "missing.pem"))


@pytest.mark.parametrize("role", ["gateway", "prefill", "decode", "colocated"])
def test_serve_without_mesh_secret_does_not_start(
    role: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A service started on its own has no in-process way to share a generated secret: it
    refuses to start (before loading anything) rather than open an internal port."""
    for name in ("PDMESH_MESH_SECRET", "PDMESH_MESH_SECRET_FILE"):
        monkeypatch.delenv(name, raising=False)
    workers = ["--prefill-addr", "x:1", "--decode-addr", "y:1"]
    assert main(["serve", role, "--port", "0", *workers]) == 2
    assert "needs the mesh secret" in capsys.readouterr().err
