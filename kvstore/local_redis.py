"""A private redis-server on loopback, without persistence: for ``pdmesh up --store redis``,
benchmarks, and tests (which talk to a real Redis, never a mock).

``proc, url = start_redis()`` ... ``stop_redis(proc)``.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO, NoReturn

_NUM_START_ATTEMPTS = 3
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def start_redis(
    timeout_s: float = 10.0, port: int | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Starts redis-server on a free loopback port (or ``port``, to restart one) without
    persistence and waits until it answers PING. Returns the process and its URL.

    FileNotFoundError if redis-server is missing (scripts/install_redis.sh installs it).
    """
    executable = shutil.which("redis-server")
    if executable is None:
        _missing_redis()
    with tempfile.TemporaryFile() as log:
        # A free port can be taken between probing it and redis binding it: try a few.
        for _ in range(_NUM_START_ATTEMPTS):
            proc, bound = _launch(executable, log, port or _free_port())
            if _wait_for_ping(proc, bound, timeout_s):
                return proc, f"redis://127.0.0.1:{bound}/0"
            stop_redis(proc)
        log.seek(0)
        output = log.read().decode(errors="replace")
    raise RuntimeError(f"redis-server did not answer PING; its output:\n{output}")


def stop_redis(proc: subprocess.Popen[bytes]) -> None:
    """Stops a server from ``start_redis``; kills it if it ignores SIGTERM."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _launch(executable: str, log: IO[bytes], port: int) -> tuple[subprocess.Popen[bytes], int]:
    proc = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--loglevel", "warning"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tempfile.gettempdir(),
        start_new_session=True,  # a terminal's Ctrl-C is for our launcher, which stops it last
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    return proc, port


def _die_with_parent() -> None:
    """Linux: SIGTERM when the process that started the server dies, however it dies (its
    own session keeps it out of a terminal's Ctrl-C, so nothing else would stop it)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _missing_redis() -> NoReturn:
    raise FileNotFoundError(
        "redis-server is not on PATH (scripts/install_redis.sh installs it), or give a redis:// URL"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_ping(proc: subprocess.Popen[bytes], port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False  # exited: most likely the port was taken
        if _pings(port):
            return True
        time.sleep(0.02)
    return False


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False
