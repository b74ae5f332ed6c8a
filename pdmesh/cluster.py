"""``pdmesh up``: one process per service on this host, started and stopped in order.

Each worker and the gateway run ``python -m pdmesh.services`` (each worker's engine core is a
process of its own below it), so no two services share a GIL and none shares one with a load
generator. The embedded store becomes a private redis-server index with block bytes in host
shared memory: no external server. Stopping drains the gateway first (running requests
finish), then the workers, then the store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from engine.config import EngineConfig
from kvstore.local_redis import start_redis, stop_redis
from pdmesh.mesh import MeshConfig, service_metrics_port, warn_shared_devices
from pdmesh.security import SecurityConfig
from pdmesh.services import (
    CHILD_COMMAND,
    LISTENING,
    ServiceSpec,
    describe_gateway,
    describe_workers,
)

logger = logging.getLogger(__name__)

#: Model loading (and CUDA graph capture) of the slowest worker.
START_TIMEOUT_S = 900.0


class ServiceExited(RuntimeError):
    pass


@dataclass
class Child:
    name: str
    role: str
    process: subprocess.Popen[bytes]
    address: str = ""

    def wait_listening(self, deadline: float) -> str:
        """Reads the child's output until it says where it listens (it serves from then)."""
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline().decode(errors="replace")
            if not line:
                code = self.process.wait()
                raise ServiceExited(f"{self.name} exited ({code}) before serving")
            if LISTENING in line:
                self.address = line.rsplit(LISTENING, 1)[1].strip()
                self._relay()
                return self.address
            sys.stdout.write(f"[{self.name}] {line}")
        raise ServiceExited(f"{self.name} did not serve in {START_TIMEOUT_S:.0f} s")

    def _relay(self) -> None:
        """Forwards the rest of the child's output (its logs go to stderr, shared)."""

        def copy() -> None:
            assert self.process.stdout is not None
            for raw in self.process.stdout:
                sys.stdout.write(f"[{self.name}] {raw.decode(errors='replace')}")
                sys.stdout.flush()

        threading.Thread(target=copy, daemon=True).start()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def join(self, timeout_s: float) -> None:
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
            self.process.kill()
            self.process.wait()
        if self.process.stdin is not None:
            self.process.stdin.close()


class LocalCluster:
    """The services of ``config`` as processes of this host; ``start`` returns when the
    gateway serves, ``stop`` drains and stops them all."""

    def __init__(self, config: MeshConfig, log_format: str = "text") -> None:
        self.config = config
        self.security: SecurityConfig = config.security.with_mesh_secret()
        self.log_format = log_format
        self.store = config.store
        self._redis: subprocess.Popen[bytes] | None = None
        self.workers: list[Child] = []
        self.gateway: Child | None = None

    @property
    def gateway_address(self) -> str:
        assert self.gateway is not None
        return self.gateway.address

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        config = self.config
        if config.store == "embedded":
            self._redis, url = start_redis()
            self.store = url.replace("redis://", "redis+shm://", 1)
        warn_shared_devices(config)
        tp = {"prefill": config.prefill_tp, "decode": config.decode_tp}
        counts: dict[str, int] = {}
        for index, (role, place) in enumerate(zip(config.roles, config.placements(), strict=True)):
            number = counts[role] = counts.get(role, -1) + 1
            spec = self._spec(
                role,
                place.engine(config.engine, tp.get(role, config.prefill_tp)),
                f"{config.worker_host}:{config.worker_port(index)}",
                service_metrics_port(config.metrics_port, 1 + index),
            )
            self.workers.append(self._launch(f"{role}-{number}", spec, place.env()))
        deadline = time.monotonic() + START_TIMEOUT_S
        for worker in self.workers:  # they load their models at the same time
            worker.wait_listening(deadline)
        gateway = dataclasses.replace(
            self._spec(
                "gateway",
                config.engine,
                f"{config.host}:{config.gateway_port}",
                service_metrics_port(config.metrics_port, 0),
            ),
            prefill=self._addresses("prefill"),
            decode=self._addresses("decode"),
            colocated=self._addresses("colocated"),
            http_port=config.http_port,
            served_model_name=config.served_model_name,
        )
        self.gateway = self._launch("gateway", gateway, {})
        self.gateway.wait_listening(deadline)

    def _addresses(self, role: str) -> tuple[str, ...]:
        return tuple(w.address for w in self.workers if w.role == role)

    def _spec(
        self, role: str, engine: EngineConfig, address: str, metrics: int | None
    ) -> ServiceSpec:
        return ServiceSpec(
            role=role,
            engine=engine,
            address=address,
            store=self.store,
            security=self.security,
            limits=self.config.limits,
            metrics_port=metrics,
            store_capacity_blocks=self.config.store_capacity_blocks,
            log_format=self.log_format,
        )

    def _launch(self, name: str, spec: ServiceSpec, env: dict[str, str]) -> Child:
        process = subprocess.Popen(
            [sys.executable, *CHILD_COMMAND],
            stdin=subprocess.PIPE,  # the spec, then held open: its end stops the child
            stdout=subprocess.PIPE,
            env={**os.environ, **env},
            start_new_session=True,  # a terminal's Ctrl-C reaches us; we stop them in order
        )
        assert process.stdin is not None
        process.stdin.write(pickle.dumps((spec, self._describe(spec))))
        process.stdin.flush()
        return Child(name, spec.role, process)

    def _describe(self, spec: ServiceSpec) -> str:
        if spec.role == "gateway":
            return describe_gateway(self.security)
        return describe_workers(self.security, self.config.security.mesh_secret is None)

    def exited(self) -> Child | None:
        """A service that is no longer running, if any."""
        children = [*self.workers, *([self.gateway] if self.gateway else [])]
        return next((c for c in children if c.process.poll() is not None), None)

    def stop(self) -> None:
        """Drains the gateway (its running requests finish), then stops the workers."""
        timeout = self.config.limits.drain_timeout_s + 30
        if self.gateway is not None:
            self.gateway.terminate()
            self.gateway.join(timeout)
        for worker in self.workers:
            worker.terminate()
        for worker in self.workers:
            worker.join(timeout)
        if self._redis is not None:
            stop_redis(self._redis)
            self._redis = None
