"""Tensor parallelism across processes: rank 0 schedules and serves, every rank runs each step.

Rank 0 (the leader, inside the serving process) spawns ranks 1..N-1 (followers). Before each
forward pass it broadcasts a fixed-size header and the step's two packed integer tensors;
every rank rebuilds the same inputs, runs its shard of the model, and joins the all-reduces.
KV block reads and writes for the shared store are broadcast the same way. Nothing is
pickled per step. NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import socket
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.parallel import TPGroup

if TYPE_CHECKING:
    from engine.model_runner import PackedStep

logger = logging.getLogger(__name__)

OP_FORWARD, OP_READ, OP_WRITE, OP_STOP = range(4)
HEADER_LEN = 8
#: A rank that stops answering turns a step's collective into an error after this long.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
#: Followers wait for the next header however long the leader idles: headers travel on a
#: separate CPU (gloo) group with this timeout. A leader that dies closes its sockets, which
#: ends the wait with an error at once.
IDLE_TIMEOUT = datetime.timedelta(days=30)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _backend(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init_group(rank: int, world: int, device: str, init_method: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
    elif rank > 0:  # followers share the host's cores with the leader's process
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group(
        _backend(device),
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )


def control_group() -> dist.ProcessGroup:
    """The CPU group step headers travel on (created collectively by every rank)."""
    group = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
    assert group is not None
    return group


def rank_device(config: EngineConfig, rank: int) -> str:
    return f"cuda:{rank}" if config.device.startswith("cuda") else config.device


class TPLeader:
    """Rank 0's side: starts the followers and tells them what to run."""

    def __init__(self, config: EngineConfig) -> None:
        self.world = config.tensor_parallel_size
        self.device = torch.device(rank_device(config, 0))
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = multiprocessing.get_context("spawn")
        self.followers = [
            context.Process(
                target=follower_main, args=(rank, self.world, config, init_method), daemon=True
            )
            for rank in range(1, self.world)
        ]
        for process in self.followers:
            process.start()
        init_group(0, self.world, config.device, init_method)
        self.control = control_group()
        self.group = TPGroup(0, self.world, dist.group.WORLD, config.expert_parallel_size)

    def _header(self, op: int, fields: list[int]) -> None:
        values = [op, *fields] + [0] * (HEADER_LEN - 1 - len(fields))
        dist.broadcast(torch.tensor(values, dtype=torch.int64), src=0, group=self.control)

    def send_forward(self, step: PackedStep, longs: torch.Tensor, ints: torch.Tensor) -> None:
        self._header(OP_FORWARD, step.header())
        dist.broadcast(longs, src=0)
        dist.broadcast(ints, src=0)

    def send_read(self, block_ids: list[int]) -> None:
        self._header(OP_READ, [len(block_ids)])
        dist.broadcast(torch.tensor(block_ids, dtype=torch.int64, device=self.device), src=0)

    def send_write(self, block_ids: list[int], raw: torch.Tensor) -> None:
        self._header(OP_WRITE, [len(block_ids), raw.shape[1]])
        dist.broadcast(torch.tensor(block_ids, dtype=torch.int64, device=self.device), src=0)
        dist.broadcast(raw.to(self.device), src=0)

    @property
    def followers_alive(self) -> bool:
        return all(p.is_alive() for p in self.followers)

    def shutdown(self) -> None:
        if self.followers_alive:
            self._header(OP_STOP, [])
        for process in self.followers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
        dist.destroy_process_group()


def follower_main(rank: int, world: int, config: EngineConfig, init_method: str) -> None:
    """A follower rank: builds its shard of the model and cache, then mirrors rank 0."""
    from engine.model_runner import ModelRunner, PackedStep
    from engine.model_source import load_model_config, resolve_model

    init_group(rank, world, config.device, init_method)
    control = control_group()
    source = resolve_model(config.model)
    runner = ModelRunner(
        config,
        load_model_config(source),
        source,
        device=rank_device(config, rank),
        tp=TPGroup(rank, world, dist.group.WORLD, config.expert_parallel_size),
    )
    device = runner.device
    header = torch.empty(HEADER_LEN, dtype=torch.int64)

    def receive(count: int, dtype: torch.dtype) -> torch.Tensor:
        tensor = torch.empty(count, dtype=dtype, device=device)
        dist.broadcast(tensor, src=0)
        return tensor

    while True:
        dist.broadcast(header, src=0, group=control)
        op, *fields = header.tolist()
        if op == OP_STOP:
            break
        if op == OP_FORWARD:
            step = PackedStep([], [], *fields[2:6])
            longs = receive(fields[0], torch.int64)
            ints = receive(fields[1], torch.int32)
            runner.forward_packed(step, longs, ints)
        elif op == OP_READ:
            block_ids = receive(fields[0], torch.int64).tolist()
            runner.gathered_blocks(block_ids)
        elif op == OP_WRITE:
            block_ids = receive(fields[0], torch.int64).tolist()
            raw = torch.empty(fields[0], fields[1], dtype=torch.uint8, device=device)
            dist.broadcast(raw, src=0)
            runner.write_local(block_ids, raw)
    runner.release_graphs()
    dist.destroy_process_group()
