"""Command-line flags for API keys, the mesh secret and TLS (``pdmesh up``, ``pdmesh serve``,
``pdmesh generate --target``). Every flag also reads a ``PDMESH_*`` variable; the mesh
secret has no flag of its own, because a command line is visible to every local user."""

from __future__ import annotations

import argparse
import os

from serving.security import ClientSecurity, SecurityConfig, security_from


def add_security_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security (see docs/operations.md: Security)")
    group.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="a key clients must present as `authorization: Bearer KEY` (repeatable; "
        "also PDMESH_API_KEYS, comma-separated). Default: the public API is open",
    )
    group.add_argument("--api-key-file", help="one API key per line (also PDMESH_API_KEY_FILE)")
    group.add_argument(
        "--mesh-secret-file",
        help="the secret every internal call carries (also PDMESH_MESH_SECRET_FILE, or the "
        "value in PDMESH_MESH_SECRET). `up` generates one when none is given",
    )
    group.add_argument("--tls-cert", help="PEM certificate chain of the public port (+ --tls-key)")
    group.add_argument("--tls-key", help="PEM private key of the public port")
    group.add_argument("--mesh-tls-cert", help="mutual TLS between services: this certificate")
    group.add_argument("--mesh-tls-key", help="mutual TLS between services: its key")
    group.add_argument("--mesh-tls-ca", help="mutual TLS between services: the CA of all peers")


def security_config_from(args: argparse.Namespace) -> SecurityConfig:
    return security_from(
        api_keys=args.api_key,
        api_key_file=args.api_key_file,
        mesh_secret_file=args.mesh_secret_file,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        mesh_tls_cert=args.mesh_tls_cert,
        mesh_tls_key=args.mesh_tls_key,
        mesh_tls_ca=args.mesh_tls_ca,
    )


def add_client_security_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api-key", help="--target: the gateway's API key (default: $PDMESH_API_KEY)"
    )
    parser.add_argument(
        "--tls-ca", help="--target: connect with TLS, trusting this PEM CA (also PDMESH_TLS_CA)"
    )
    parser.add_argument(
        "--tls", action="store_true", help="--target: connect with TLS, trusting the system CAs"
    )


def client_security_from(args: argparse.Namespace) -> ClientSecurity:
    tls_ca = args.tls_ca or os.environ.get("PDMESH_TLS_CA") or None
    return ClientSecurity(
        api_key=args.api_key or os.environ.get("PDMESH_API_KEY") or None,
        is_tls=args.tls or tls_ca is not None,
        tls_ca=tls_ca,
    )
