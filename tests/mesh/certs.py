"""Throwaway certificate authorities and certificates for TLS tests, made with the `openssl`
command line (no Python crypto package needed). Keys are EC P-256: fast to generate."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

OPENSSL_TIMEOUT_S = 60
#: Every certificate here names loopback, where the tests dial.
LOOPBACK_NAMES = "IP:127.0.0.1,DNS:localhost"


@dataclass(frozen=True)
class Issued:
    """A certificate (PEM), its key, and the CA certificate that signed it."""

    cert: Path
    key: Path
    ca: Path


def openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        pytest.fail("the TLS tests need the `openssl` command (apt-get install openssl)")
    return path


def _run(*args: str) -> None:
    result = subprocess.run(
        [openssl(), *args], capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S
    )
    assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"


def _new_key(path: Path) -> None:
    _run("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA: (certificate, key)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _new_key(key)
    _run(
        *("req", "-x509", "-new", "-key", str(key), "-out", str(cert), "-days", "2"),
        *("-subj", f"/CN={name}"),
        *("-addext", "basicConstraints=critical,CA:TRUE"),
        *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
    )
    return cert, key


def issue(directory: Path, name: str, ca: tuple[Path, Path]) -> Issued:
    """A certificate for loopback that serves as server and as client certificate."""
    ca_cert, ca_key = ca
    cert, key, request = (directory / f"{name}{ext}" for ext in (".pem", ".key", ".csr"))
    extensions = directory / f"{name}.ext"
    extensions.write_text(
        f"subjectAltName={LOOPBACK_NAMES}\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    _new_key(key)
    _run("req", "-new", "-key", str(key), "-out", str(request), "-subj", f"/CN={name}")
    _run(
        *("x509", "-req", "-in", str(request), "-CA", str(ca_cert), "-CAkey", str(ca_key)),
        *("-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(extensions)),
    )
    return Issued(cert, key, ca_cert)
