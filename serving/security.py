"""Who may call which service, and over what transport: API keys for the gateway's public
API, one mesh secret for the internal workers, TLS for the public port and mutual TLS between
services.

Secrets come from files or the environment (``PDMESH_*``), or ``--api-key`` flags. They are
kept out of ``repr`` so that logging a config cannot leak them, and no error message quotes
one.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

AUTHORIZATION = "authorization"
#: A generated mesh secret has 32 random bytes; a configured one needs at least this many chars.
MIN_MESH_SECRET_CHARS = 16


def _check_token(what: str, token: str) -> None:
    """A bearer token must fit an ASCII gRPC metadata value with no whitespace. The message
    names the kind of token, never its value."""
    if not token:
        raise ValueError(f"{what} is empty")
    if not all(33 <= ord(char) <= 126 for char in token):
        raise ValueError(f"{what} must be printable ASCII without spaces")


def _check_file(what: str, path: Path | None) -> None:
    if path is not None and not path.is_file():
        raise ValueError(f"{what}: no such file {path}")


@dataclass(frozen=True)
class SecurityConfig:
    """Authentication and transport security of one service or of a whole ``pdmesh up``."""

    #: Keys a client of the gateway presents as ``authorization: Bearer KEY``. Empty: the
    #: public API is open, as vLLM and TGI are without ``--api-key``.
    api_keys: frozenset[str] = field(default=frozenset(), repr=False)
    #: Shared by the gateway and its workers; a worker refuses any call without it.
    mesh_secret: str | None = field(default=None, repr=False)
    #: PEM certificate chain and key of the gateway's public port (TLS when set).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Mutual TLS between the gateway and workers: every service presents this certificate
    #: (it must name the host the gateway dials, e.g. 127.0.0.1 for ``pdmesh up``) and
    #: accepts only peers whose certificates this CA signed.
    mesh_tls_cert: Path | None = None
    mesh_tls_key: Path | None = None
    mesh_tls_ca: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.api_keys, frozenset):
            raise ValueError("api_keys must be a frozenset")
        for key in self.api_keys:
            _check_token("an API key", key)
        if self.mesh_secret is not None:
            _check_token("the mesh secret", self.mesh_secret)
            if len(self.mesh_secret) < MIN_MESH_SECRET_CHARS:
                raise ValueError(f"the mesh secret needs at least {MIN_MESH_SECRET_CHARS} chars")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and a key (--tls-cert, --tls-key)")
        mesh_tls = (self.mesh_tls_cert, self.mesh_tls_key, self.mesh_tls_ca)
        if any(path is None for path in mesh_tls) and any(path is not None for path in mesh_tls):
            raise ValueError(
                "mutual TLS needs --mesh-tls-cert, --mesh-tls-key and --mesh-tls-ca together"
            )
        for what, path in (
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--mesh-tls-cert", self.mesh_tls_cert),
            ("--mesh-tls-key", self.mesh_tls_key),
            ("--mesh-tls-ca", self.mesh_tls_ca),
        ):
            _check_file(what, path)

    @property
    def is_public_tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def is_mesh_tls(self) -> bool:
        return self.mesh_tls_ca is not None

    def with_mesh_secret(self) -> SecurityConfig:
        """This config, with a fresh random mesh secret if it has none: ``pdmesh up`` holds its
        workers in its own process, so nobody else needs the secret, and no internal port is
        ever open."""
        if self.mesh_secret is not None:
            return self
        return dataclasses.replace(self, mesh_secret=secrets.token_urlsafe(32))

    def public_server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls_cert is None or self.tls_key is None:
            return None
        pair = (self.tls_key.read_bytes(), self.tls_cert.read_bytes())
        return grpc.ssl_server_credentials([pair])

    def mesh_server_credentials(self) -> grpc.ServerCredentials | None:
        if self.mesh_tls_cert is None or self.mesh_tls_key is None or self.mesh_tls_ca is None:
            return None
        pair = (self.mesh_tls_key.read_bytes(), self.mesh_tls_cert.read_bytes())
        return grpc.ssl_server_credentials(
            [pair], root_certificates=self.mesh_tls_ca.read_bytes(), require_client_auth=True
        )

    def mesh_channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.mesh_tls_cert is None or self.mesh_tls_key is None or self.mesh_tls_ca is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.mesh_tls_ca.read_bytes(),
            private_key=self.mesh_tls_key.read_bytes(),
            certificate_chain=self.mesh_tls_cert.read_bytes(),
        )


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches the gateway: its API key and TLS."""

    api_key: str | None = None
    #: TLS on the channel; the server is verified against ``tls_ca``, or the system CAs.
    is_tls: bool = False
    tls_ca: str | None = None

    def __post_init__(self) -> None:
        if self.tls_ca is not None and not self.is_tls:
            raise ValueError("a TLS CA is given, but TLS is off")
        if self.tls_ca is not None and not Path(self.tls_ca).is_file():
            raise ValueError(f"--tls-ca: no such file {self.tls_ca}")

    def channel(self, target: str) -> grpc.Channel:
        if not self.is_tls:
            return grpc.insecure_channel(target)
        root = Path(self.tls_ca).read_bytes() if self.tls_ca else None
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=root))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION, f"Bearer {self.api_key}"),) if self.api_key else ()


def read_api_key_file(path: Path) -> list[str]:
    """One key per line; blank lines and ``#`` comments are skipped."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def security_from(
    *,
    api_keys: Iterable[str] = (),
    api_key_file: str | None = None,
    mesh_secret_file: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    mesh_tls_cert: str | None = None,
    mesh_tls_key: str | None = None,
    mesh_tls_ca: str | None = None,
    env: Mapping[str, str] | None = None,
) -> SecurityConfig:
    """Flags first, then ``PDMESH_*`` variables: API keys are the union of ``api_keys``,
    ``PDMESH_API_KEYS`` (comma-separated) and the key file (``api_key_file`` or
    ``PDMESH_API_KEY_FILE``); the mesh secret is ``PDMESH_MESH_SECRET`` or the file
    (``mesh_secret_file`` or ``PDMESH_MESH_SECRET_FILE``), not both."""
    env = os.environ if env is None else env
    keys = {key.strip() for key in api_keys}
    keys.update(key.strip() for key in env.get("PDMESH_API_KEYS", "").split(",") if key.strip())
    key_file = api_key_file or env.get("PDMESH_API_KEY_FILE")
    if key_file:
        keys.update(read_api_key_file(Path(key_file)))
    secret_file = mesh_secret_file or env.get("PDMESH_MESH_SECRET_FILE")
    secret = env.get("PDMESH_MESH_SECRET") or None
    if secret_file:
        if secret is not None:
            raise ValueError("give the mesh secret once: PDMESH_MESH_SECRET or a secret file")
        secret = Path(secret_file).read_text().strip()
    return SecurityConfig(
        api_keys=frozenset(keys),
        mesh_secret=secret,
        tls_cert=_path(tls_cert or env.get("PDMESH_TLS_CERT")),
        tls_key=_path(tls_key or env.get("PDMESH_TLS_KEY")),
        mesh_tls_cert=_path(mesh_tls_cert or env.get("PDMESH_MESH_TLS_CERT")),
        mesh_tls_key=_path(mesh_tls_key or env.get("PDMESH_MESH_TLS_KEY")),
        mesh_tls_ca=_path(mesh_tls_ca or env.get("PDMESH_MESH_TLS_CA")),
    )
