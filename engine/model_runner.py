"""Owns the model and its paged KV cache on one device; turns a scheduled step into one
forward pass and the next tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from engine.attention import AttentionMetadata, PagedAttention
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import DecodeGraphs
from engine.layers import LinearBase
from engine.model_source import ModelSource
from engine.models import MODEL_REGISTRY, LlamaForCausalLM
from engine.offload import build_offloaded
from engine.parallel import SINGLE, TPGroup, tensor_parallel
from engine.quantization import linear_method
from engine.sampler import Sampler
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence, TokenLogprob
from engine.weight_stream import WeightStreamer
from engine.weights import iter_weights
from kvstore.gpu_paths import PinnedStaging

if TYPE_CHECKING:
    from engine.tensor_parallel import TPLeader

logger = logging.getLogger(__name__)

# Without a configured block count, CPU caches hold this many blocks (or one longest sequence).
CPU_DEFAULT_NUM_BLOCKS = 1024
#: Device memory kept free for everything else on the GPU (CUDA context, other processes).
KV_FREE_MARGIN_BYTES = 1 << 30
#: Forward-pass activations, sampler and CUDA-graph buffers, beyond the weights.
ACTIVATION_HEADROOM_BYTES = 2 << 30
#: Blocks per pinned staging transfer (2 MiB each for a Llama-3.1-8B shape: 64 MiB pinned).
STAGING_ROWS = 32


def resolve_quantization(asked: str | None, checkpoint: str | None) -> str | None:
    """The flag's quantization, or the checkpoint's own; a pre-quantized checkpoint is never
    re-quantized another way."""
    if checkpoint is not None and asked not in (None, checkpoint):
        raise ValueError(f"the checkpoint is quantized {checkpoint}; cannot serve it as {asked}")
    return asked or checkpoint


def build_model(
    config: ModelConfig,
    source: ModelSource,
    dtype: torch.dtype,
    device: str,
    load_format: str,
    quantization: str | None = None,
) -> LlamaForCausalLM:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), linear_method(quantization):
            model = MODEL_REGISTRY[config.architecture](config)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        fill_dummy_weights(model)
    else:
        model.load_weights(iter_weights(source, config))
    return model.eval()


def fill_dummy_weights(model: torch.nn.Module) -> None:
    """Random weights; small values keep activations finite. Linear layers draw their own
    (quantized ones quantize a random float matrix a slice at a time)."""
    linear_params: set[int] = set()
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.fill_dummy()
            linear_params.update(id(p) for p in module.parameters(recurse=False))
    for param in model.parameters():
        if id(param) not in linear_params:
            param.data.normal_(0, 0.02)


@dataclass(frozen=True)
class PackedStep:
    """One step's inputs as two integer lists (what crosses to tensor-parallel followers).

    longs = input_ids + positions + slot_mapping (+ substitutions); ints = seq_lens + cu_seqlens_q +
    block_tables (row-major, num_seqs x max_blocks) + rows whose logits are sampled.
    """

    longs: list[int]
    ints: list[int]
    num_tokens: int
    num_seqs: int
    max_blocks: int
    num_rows: int
    #: Inputs taken from the previous step's device tokens: longs end with their positions,
    #: then their source rows. Only rank 0 reads them (it patches the inputs before they are
    #: broadcast), so the count is not part of the header.
    num_substitutions: int = 0

    def header(self) -> list[int]:
        return [
            len(self.longs),
            len(self.ints),
            self.num_tokens,
            self.num_seqs,
            self.max_blocks,
            self.num_rows,
        ]


class ModelRunner:
    def __init__(
        self,
        engine_config: EngineConfig,
        model_config: ModelConfig,
        source: ModelSource,
        leader: TPLeader | None = None,
        device: str | None = None,
        tp: TPGroup = SINGLE,
    ):
        self.config = engine_config
        self.model_config = model_config
        #: Rank 0 of a tensor-parallel group tells its followers what to run.
        self.leader = leader
        self.tp = tp
        self.device = torch.device(device or engine_config.device)
        self.dtype = engine_config.torch_dtype
        self.block_size = engine_config.cache.block_size
        #: Linear weights: int8, fp8, or None (the model's dtype).
        self.quantization = resolve_quantization(
            engine_config.quantization, model_config.quantization
        )
        #: Streams offloaded decoder layers through device buffers (``--offload-weights``).
        self.weight_stream: WeightStreamer | None = None
        with tensor_parallel(tp):
            if engine_config.offload.enabled:
                if self.quantization is not None:
                    raise ValueError("--offload-weights streams 16-bit layers; drop --quantization")
                self.model, self.weight_stream = build_offloaded(
                    model_config,
                    source,
                    self.dtype,
                    self.device,
                    engine_config.load_format,
                    engine_config.offload,
                    batch=engine_config.scheduler.max_num_seqs,
                    rank=tp.rank,
                )
            else:
                self.model = build_model(
                    model_config,
                    source,
                    self.dtype,
                    str(self.device),
                    engine_config.load_format,
                    self.quantization,
                )
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.num_blocks = self._decide_num_blocks()
        self._allocate_kv_cache()
        #: Pinned host rows KV blocks travel through between the store and a GPU cache.
        self.staging = (
            PinnedStaging(self.bytes_per_stored_block, STAGING_ROWS, self.device)
            if self.device.type == "cuda" and tp.rank == 0  # followers never touch the store
            else None
        )
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        # Under tensor parallelism every rank captures the same buckets, NCCL all-reduces
        # included, and replays them in the same order (each rank runs every step).
        # Streamed layers rotate through the ring's slots; graphs would pin them (offload.py).
        use_graphs = not engine_config.enforce_eager and self.weight_stream is None
        if self.device.type == "cuda" and use_graphs:
            longest = engine_config.max_model_len or model_config.max_position_embeddings
            self.graphs = DecodeGraphs(
                self.model,
                engine_config.scheduler.max_num_seqs,
                -(-longest // self.block_size),
                self.device,
            )

    def release_graphs(self, wait: bool = True) -> None:
        """Destroys the captured graphs; they hold NCCL work that must go before the
        communicator does (tearing down the group first hung). ``wait=False`` when a rank
        died: a replayed all-reduce waiting for it would never finish."""
        self.graphs = None
        if wait and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wait_device(self) -> None:
        """Returns once the device has run everything queued so far (no-op on the CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @property
    def bytes_per_stored_block(self) -> int:
        """A stored block holds every KV head (whatever this rank's share)."""
        layer = self.attention_layers[0]
        per_token = 2 * self.model_config.num_key_value_heads * layer.head_dim
        return per_token * self.dtype.itemsize * self.block_size * len(self.attention_layers)

    def _bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * layer.num_kv_heads * layer.head_dim * self.dtype.itemsize
        return per_token * self.block_size * len(self.attention_layers)

    def _decide_num_blocks(self) -> int:
        num_blocks = self._local_num_blocks()
        if self.tp.size > 1:  # every rank's cache must have the same geometry
            agreed = torch.tensor([num_blocks], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.tp.group)
            num_blocks = int(agreed.item())
        return num_blocks

    def _local_num_blocks(self) -> int:
        configured = self.config.cache.num_blocks
        if configured is not None:
            return configured
        longest = self.config.max_model_len or self.model_config.max_position_embeddings
        one_sequence = -(-longest // self.block_size)
        if self.device.type != "cuda":
            return max(CPU_DEFAULT_NUM_BLOCKS, one_sequence)
        return max(one_sequence, int(self._kv_budget_bytes() // self._bytes_per_block()))

    def _kv_budget_bytes(self) -> float:
        """This worker's share of the device, less what it already holds (weights, graphs'
        pools) and the activations' headroom; never more than is free now, so a worker that
        starts second on a shared GPU still gets its own share and no more."""
        free, total = torch.cuda.mem_get_info(self.device)
        share = self.config.cache.gpu_memory_utilization * total
        held = torch.cuda.memory_reserved(self.device)
        return min(share - held, free - KV_FREE_MARGIN_BYTES) - ACTIVATION_HEADROOM_BYTES

    def _allocate_kv_cache(self) -> None:
        """One tensor for every layer's K and V, so moving blocks of all layers is one
        gather or scatter; each layer's caches are views of it."""
        layer = self.attention_layers[0]
        num_layers, heads = len(self.attention_layers), layer.num_kv_heads
        self.kv_cache = torch.zeros(
            (num_layers, 2, self.num_blocks, self.block_size, heads, layer.head_dim),
            dtype=self.dtype,
            device=self.device,
        )  # (layers, 2, num_blocks, block_size, local kv_heads, D)
        for i, attn in enumerate(self.attention_layers):
            attn.k_cache, attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
        logger.info("KV cache: %d blocks of %d tokens", self.num_blocks, self.block_size)

    # -- KV blocks to and from the shared store ------------------------------------------------
    # A stored block holds every KV head: (layers, 2, block_size, all kv_heads, D). Under
    # tensor parallelism each rank holds some heads, so reads gather and writes slice; the
    # stored layout is the same whatever the TP size of the writer or the reader.
    @torch.inference_mode()
    def read_blocks(self, block_ids: list[int]) -> list[bytes]:
        raw = self.device_rows(block_ids)
        if self.staging is None:
            return [bytes(row.numpy()) for row in raw]
        rows = self.staging.num_rows
        return [
            data
            for start in range(0, len(block_ids), rows)
            for data in self.staging.download(raw[start : start + rows])
        ]

    @torch.inference_mode()
    def device_rows(self, block_ids: list[int]) -> torch.Tensor:
        """The stored form of the blocks, still on the device: (num_blocks, block bytes)
        uint8 (every rank takes part under tensor parallelism)."""
        if self.leader is not None:
            self.leader.send_read(block_ids)
        full = self.gathered_blocks(block_ids)
        return full.contiguous().view(torch.uint8).reshape(len(block_ids), -1)

    def gathered_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Every KV head of the blocks (a collective under tensor parallelism: all ranks call
        it together), (num_blocks, layers, 2, block_size, all kv_heads, D)."""
        return self.gather_heads(self._local_blocks(block_ids))

    def _local_blocks(self, block_ids: list[int]) -> torch.Tensor:
        index = self.to_device(block_ids, torch.int64)
        blocks = self.kv_cache.index_select(2, index)  # (layers, 2, n, block_size, heads, D)
        return blocks.permute(2, 0, 1, 3, 4, 5)  # (n, layers, 2, block_size, local heads, D)

    def gather_heads(self, local: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.tp.size)]
        dist.all_gather(parts, local.contiguous(), group=self.tp.group)
        return torch.cat(parts[:: self._kv_replicas()], dim=4)  # one copy of each head shard

    def _kv_replicas(self) -> int:
        """Ranks holding the same KV heads (when there are fewer KV heads than ranks)."""
        return max(1, self.tp.size // self.model_config.num_key_value_heads)

    @torch.inference_mode()
    def write_blocks(self, block_ids: list[int], data: list[bytes]) -> None:
        if self.staging is None:
            raw = torch.stack([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data])
            self.write_rows(block_ids, raw)
            return
        # Through pinned rows: one host copy per block, then an async copy to the device that
        # the cache writes queued after it on the same stream wait for.
        rows = self.staging.num_rows
        for start in range(0, len(block_ids), rows):
            chunk = block_ids[start : start + rows]
            self.write_rows(chunk, self.staging.upload(data[start : start + rows]))

    def write_rows(self, block_ids: list[int], raw: torch.Tensor) -> None:
        """raw: (num_blocks, block bytes) uint8 in the stored form, on any device."""
        if self.leader is not None:
            self.leader.send_write(block_ids, raw)
        self.write_local(block_ids, raw.to(self.device))

    def write_local(self, block_ids: list[int], raw: torch.Tensor) -> None:
        """raw: (num_blocks, bytes of a full block); this rank keeps its KV heads."""
        layer = self.attention_layers[0]
        total_heads = self.model_config.num_key_value_heads
        shape = (len(self.attention_layers), 2, self.block_size, total_heads, layer.head_dim)
        blocks = raw.view(self.dtype).view(len(block_ids), *shape)
        shard = self.tp.rank // self._kv_replicas()
        heads = blocks[..., shard * layer.num_kv_heads : (shard + 1) * layer.num_kv_heads, :]
        index = self.to_device(block_ids, torch.int64)
        self.kv_cache.index_copy_(2, index, heads.permute(1, 2, 0, 3, 4, 5))

    # -- one forward pass -----------------------------------------------------------------------
    def _pack(
        self, chunks: list[ScheduledChunk], pending: dict[Sequence, int] | None = None
    ) -> PackedStep:
        """The step as two flat integer lists: every rank rebuilds the same inputs from it.
        ``pending`` maps a sequence whose last token is still on the device to its row in the
        previous step's tokens; the step's input at that position is filled in on the device."""
        input_ids: list[int] = []
        subst_dst: list[int] = []
        subst_src: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        cu_seqlens_q = [0]
        rows: list[int] = []
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.end
            input_ids.extend(seq.tokens_between(start, end))
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(
                table[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(start, end)
            )
            if pending and seq in pending and start < seq.num_tokens <= end:
                subst_dst.append(cu_seqlens_q[-1] + seq.num_tokens - 1 - start)
                subst_src.append(pending[seq])
            seq_lens.append(end)
            cu_seqlens_q.append(cu_seqlens_q[-1] + chunk.num_tokens)
            if chunk.completes:
                rows.append(cu_seqlens_q[-1] - 1)
        max_blocks = max(len(c.seq.block_table) for c in chunks)
        tables: list[int] = []
        for chunk in chunks:
            table = chunk.seq.block_table
            tables.extend(table)
            tables.extend([0] * (max_blocks - len(table)))
        return PackedStep(
            longs=input_ids + positions + slots + subst_dst + subst_src,
            ints=seq_lens + cu_seqlens_q + tables + rows,
            num_tokens=len(input_ids),
            num_seqs=len(chunks),
            max_blocks=max_blocks,
            num_rows=len(rows),
            num_substitutions=len(subst_dst),
        )

    def to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        """``values`` on the device without waiting for it (a pinned, asynchronous copy)."""
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def forward_packed(
        self, step: PackedStep, longs: torch.Tensor, ints: torch.Tensor
    ) -> torch.Tensor | None:
        """Runs the model on a packed step; returns logits of the rows to sample (or None)."""
        tokens, seqs = step.num_tokens, step.num_seqs
        tables_end = 2 * seqs + 1 + seqs * step.max_blocks
        meta = AttentionMetadata(
            slot_mapping=longs[2 * tokens : 3 * tokens],
            block_tables=ints[2 * seqs + 1 : tables_end].view(seqs, step.max_blocks),
            seq_lens=ints[:seqs],
            cu_seqlens_q=ints[seqs : 2 * seqs + 1],
            is_decode=tokens == seqs,
        )
        input_ids, positions = longs[:tokens], longs[tokens : 2 * tokens]
        if self.graphs is not None and self.graphs.fits(meta):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta)  # (num_tokens, hidden)
        if step.num_rows == 0:
            return None
        return self.model.compute_logits(hidden[ints[tables_end:].long()])

    @torch.inference_mode()
    def launch(
        self, chunks: list[ScheduledChunk], previous: DeviceTokens | None = None
    ) -> torch.Tensor | None:
        """Starts one forward pass over every chunk; returns the logits (on the device, maybe
        still being computed) of each chunk that completes its sequence's computed tokens, in
        chunk order. Inputs still pending on the device come from ``previous``."""
        pending = previous.rows if previous is not None else None
        step = self._pack(chunks, pending)
        # Two host-to-device copies per step (one per dtype); the model reads views of them.
        longs = self.to_device(step.longs, torch.int64)
        ints = self.to_device(step.ints, torch.int32)
        if step.num_substitutions:
            assert previous is not None
            base, count = 3 * step.num_tokens, step.num_substitutions
            dst, src = longs[base : base + count], longs[base + count : base + 2 * count]
            longs[: step.num_tokens].index_copy_(0, dst, previous.device_ids[src])
        if self.leader is not None:
            self.leader.send_forward(step, longs, ints)
        return self.forward_packed(step, longs, ints)

    def greedy_on_device(self, logits: torch.Tensor, seqs: list[Sequence]) -> DeviceTokens:
        """Greedy tokens of ``logits`` rows, copied to the host in the background."""
        return DeviceTokens(torch.argmax(logits.float(), dim=-1), seqs)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> list[tuple[int, TokenLogprob | None]]:
        """Runs one forward pass over every chunk and samples the next token of each chunk
        that completes its sequence's computed tokens (in chunk order)."""
        logits = self.launch(chunks)
        if logits is None:
            return []
        return self.sampler(logits, [c.seq for c in chunks if c.completes])


class DeviceTokens:
    """One step's greedy tokens: on the device for the next step's inputs, and on their way
    to the host for the scheduler (read with ``tolist``, which waits for them)."""

    def __init__(self, device_ids: torch.Tensor, seqs: list[Sequence]) -> None:
        self.device_ids = device_ids
        self.seqs = seqs
        #: Sequence -> its row, for the next step's input substitution.
        self.rows = {seq: row for row, seq in enumerate(seqs)}
        self._done: torch.cuda.Event | None = None
        if device_ids.device.type == "cuda":
            self._host = torch.empty(device_ids.shape, dtype=device_ids.dtype, pin_memory=True)
            self._host.copy_(device_ids, non_blocking=True)
            self._done = torch.cuda.Event()
            self._done.record()
        else:
            self._host = device_ids

    def tolist(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        return self._host.tolist()
