"""Builds a model whose decoder layers do not all fit on the device (``--offload-weights``).

The model is constructed on the meta device (no memory), then every parameter is given its
home: embeddings, head, final norm and the first ``num_resident`` layers on the device, the
other layers in one flat host buffer each (pinned on CUDA). Weights are loaded into those
homes; with ``disk`` the host buffers are written to per-layer files and dropped. A
``WeightStreamer`` then streams the offloaded layers through a ring of device buffers.

CUDA graphs are not used when layers stream: a replayed graph would copy into the slots it
was captured with, but the ring rotates (n layers over depth slots), so those passes run
eagerly. At the batch sizes offload is for, a step is bound by the link, not by launches.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.config import ModelConfig, OffloadConfig
from engine.layers import RotaryEmbedding
from engine.model_source import ModelSource
from engine.models import MODEL_REGISTRY, LlamaForCausalLM
from engine.weight_stream import (
    DiskLayers,
    HostLayers,
    LayerStore,
    WeightStreamer,
    bind,
    flat_layout,
    host_empty,
    host_release,
    layout_numel,
    views_of,
)
from engine.weights import iter_weights

logger = logging.getLogger(__name__)

GIB = 1 << 30
#: Transfer / compute ratios this close to 1 get a third ring slot (``measured_depth``).
BALANCED = (0.75, 4 / 3)


@dataclass(frozen=True)
class OffloadPlan:
    """Which decoder layers stay on the device and how deep the ring is."""

    num_layers: int
    num_resident: int
    depth: int
    layer_bytes: int
    other_bytes: int

    @property
    def num_streamed(self) -> int:
        return self.num_layers - self.num_resident

    @property
    def device_bytes(self) -> int:
        ring = self.depth * self.layer_bytes if self.num_streamed else 0
        return self.other_bytes + self.num_resident * self.layer_bytes + ring


def plan_offload(
    num_layers: int, layer_bytes: int, other_bytes: int, budget_gib: float | None, depth: int
) -> OffloadPlan:
    """The most layers the budget keeps resident beside ``depth`` ring slots. Streamed layers
    that would fit in the ring anyway stay resident instead."""
    if budget_gib is None:
        return OffloadPlan(num_layers, 0, min(depth, num_layers), layer_bytes, other_bytes)
    budget = budget_gib * GIB
    spare = budget - other_bytes - depth * layer_bytes
    if spare < 0:
        need = (other_bytes + depth * layer_bytes) / GIB
        raise ValueError(
            f"a GPU weight budget of {budget_gib} GiB cannot hold the embeddings, head and "
            f"{depth} streaming buffers ({need:.3f} GiB)"
        )
    resident = min(num_layers, int(spare // layer_bytes))
    if num_layers - resident <= depth:
        resident = num_layers
    return OffloadPlan(num_layers, resident, depth, layer_bytes, other_bytes)


def measured_depth(layer: nn.Module, batch: int, device: torch.device, dtype: torch.dtype) -> int:
    """The ring's depth from one layer's measured transfer and compute time at ``batch``.

    Load c + depth starts when layer c has computed. Two slots keep the link busy whenever it
    is the slower side (the next copy is already running while a layer computes) and keep
    compute busy whenever that is slower; a deeper ring there would only take the device
    memory of a resident layer, which saves its copy outright. When the two are within a
    quarter of each other they interleave with no slack, so a third slot absorbs jitter.
    """
    numel = layout_numel(flat_layout(layer))
    is_cuda = device.type == "cuda"
    host = host_empty(numel, dtype, is_cuda)
    slot = torch.empty(numel, dtype=dtype, device=device)
    weights = [w for w in views_of(slot, flat_layout(layer)) if w.dim() == 2]

    def copy() -> None:
        slot.copy_(host, non_blocking=True)

    inputs = [torch.zeros(batch, w.shape[1], dtype=dtype, device=device) for w in weights]

    def compute() -> None:
        for x, w in zip(inputs, weights, strict=True):
            torch.nn.functional.linear(x, w)

    transfer, work = _seconds(copy, device), _seconds(compute, device)
    if is_cuda:
        torch.cuda.synchronize(device)
        host_release(host)
    ratio = transfer / max(work, 1e-9)
    depth = 3 if BALANCED[0] <= ratio <= BALANCED[1] else 2
    logger.info(
        "offload: one layer moves in %.2f ms and computes in %.2f ms at batch %d: depth %d",
        transfer * 1e3,
        work * 1e3,
        batch,
        depth,
    )
    return depth


def _seconds(fn: object, device: torch.device, repeats: int = 3) -> float:
    assert callable(fn)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _unique_params(module: nn.Module) -> list[tuple[nn.Module, str, nn.Parameter]]:
    return [
        (owner, name, param)
        for owner in module.modules()
        for name, param in owner._parameters.items()
        if param is not None
    ]


def _materialize(module: nn.Module, device: torch.device, homes: dict[int, nn.Parameter]) -> None:
    """Replaces meta parameters by empty ones on ``device`` (a tied parameter once)."""
    for owner, name, param in _unique_params(module):
        if param.device.type != "meta":
            continue
        if id(param) not in homes:
            homes[id(param)] = nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False
            )
        owner._parameters[name] = homes[id(param)]


def _bytes(params: list[nn.Parameter]) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in params}.values())


def meta_model(config: ModelConfig, dtype: torch.dtype) -> LlamaForCausalLM:
    """The model's structure with no memory behind it (this rank's shard under TP)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            return MODEL_REGISTRY[config.architecture](config)  # type: ignore[no-any-return]
    finally:
        torch.set_default_dtype(previous)


def weight_bytes(model: LlamaForCausalLM) -> tuple[int, int]:
    """(bytes of one decoder layer, bytes of everything else) of a built or meta model."""
    layers = list(model.model.layers)
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}
    other = [p for p in model.parameters() if id(p) not in layer_ids]
    return _bytes(list(layers[0].parameters())), _bytes(other)


class OffloadedModel:
    """The model and the streamer that feeds its offloaded layers (None: nothing streams)."""

    def __init__(
        self,
        config: ModelConfig,
        source: ModelSource,
        dtype: torch.dtype,
        device: torch.device,
        load_format: str,
        offload: OffloadConfig,
        batch: int,
        rank: int = 0,
    ) -> None:
        model = meta_model(config, dtype)
        layers = list(model.model.layers)
        layer_bytes, other_bytes = weight_bytes(model)
        depth = offload.prefetch_depth or measured_depth(layers[0], batch, device, dtype)
        self.plan = plan_offload(
            len(layers), layer_bytes, other_bytes, offload.gpu_weight_budget_gib, depth
        )
        streamed = layers[self.plan.num_resident :]
        homes: dict[int, nn.Parameter] = {}
        for layer in streamed:
            _materialize(layer, torch.device("cpu"), homes)
        _materialize(model, device, homes)
        # Pinned where the copies read them; disk flats only pass through on their way to files.
        flats = self._host_flats(streamed, pin=device.type == "cuda" and offload.weights == "cpu")
        _restore_rotary(model, config, device)
        self.model = model
        self._load(source, config, load_format, flats, device)
        self.store = self._store(offload, flats, self.plan.depth, rank, device)
        del flats
        self.streamer = (
            WeightStreamer(streamed, self.store, self.plan.depth, device, dtype)
            if streamed
            else None
        )
        logger.info(
            "offload %s: %d of %d layers resident, %d streamed through %d slots; %.2f GiB "
            "of weights on the device",
            offload.weights,
            self.plan.num_resident,
            self.plan.num_layers,
            self.plan.num_streamed,
            self.plan.depth,
            self.plan.device_bytes / GIB,
        )

    @staticmethod
    def _host_flats(streamed: list[nn.Module], pin: bool) -> list[torch.Tensor]:
        """One flat host buffer per streamed layer; its parameters become views of it."""
        flats = []
        for layer in streamed:
            layout = flat_layout(layer)
            dtype = next(layer.parameters()).dtype
            flat = host_empty(layout_numel(layout), dtype, pin)
            bind(layer, views_of(flat, layout))
            flats.append(flat)
        return flats

    def _load(
        self,
        source: ModelSource,
        config: ModelConfig,
        load_format: str,
        flats: list[torch.Tensor],
        device: torch.device,
    ) -> None:
        if load_format != "dummy":
            self.model.load_weights(iter_weights(source, config))
            return
        for param in self.model.parameters():
            if param.device.type == device.type:  # ("cuda" and "cuda:0" are one place)
                param.data.normal_(0, 0.02)
        if flats:  # random values made on the device, the same for every streamed layer
            sample = torch.empty(flats[0].shape, dtype=flats[0].dtype, device=device)
            sample.normal_(0, 0.02)
            for flat in flats:
                flat.copy_(sample)

    @staticmethod
    def _store(
        offload: OffloadConfig,
        flats: list[torch.Tensor],
        depth: int,
        rank: int,
        device: torch.device,
    ) -> LayerStore:
        if offload.weights != "disk" or not flats:
            return HostLayers(flats)
        root = Path(offload.disk_dir or tempfile.mkdtemp(prefix="pdmesh-offload-"))
        directory = root / f"rank{rank}"
        return DiskLayers(directory, flats, num_staging=depth, pin=device.type == "cuda")


def _restore_rotary(model: nn.Module, config: ModelConfig, device: torch.device) -> None:
    """The rotary table is computed at construction, which happened on the meta device: make
    it again on ``device`` and point every holder at it."""
    with torch.device(device):
        table = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
        ).cos_sin_cache
    for module in model.modules():
        if getattr(module, "cos_sin_cache", None) is not None:
            module.cos_sin_cache = table


def build_offloaded(
    config: ModelConfig,
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    load_format: str,
    offload: OffloadConfig,
    batch: int,
    rank: int = 0,
) -> tuple[LlamaForCausalLM, WeightStreamer | None]:
    built = OffloadedModel(config, source, dtype, device, load_format, offload, batch, rank)
    return built.model.eval(), built.streamer
