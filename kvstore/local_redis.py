"""A private redis-server for one run (``pdmesh up --store redis``, benchmarks)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time


def start_local_redis() -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on a free loopback port, for ``--store redis`` with no URL."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise FileNotFoundError("--store redis needs redis-server on PATH, or give a redis:// URL")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--loglevel",
            "warning",
        ],
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.05)
    process.terminate()
    raise RuntimeError("redis-server did not start")
