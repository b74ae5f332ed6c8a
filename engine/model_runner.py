"""Owns the model and its paged KV cache on one device; turns a scheduled step into one
forward pass and the next tokens."""

from __future__ import annotations

import logging

import torch

from engine.attention import AttentionMetadata, PagedAttention
from engine.config import EngineConfig, ModelConfig
from engine.cuda_graphs import DecodeGraphs
from engine.model_source import ModelSource
from engine.models import MODEL_REGISTRY, LlamaForCausalLM
from engine.sampler import Sampler
from engine.scheduler import ScheduledChunk
from engine.sequence import TokenLogprob
from engine.weights import iter_weights

logger = logging.getLogger(__name__)

# Without a configured block count, CPU caches hold this many blocks (or one longest sequence).
CPU_DEFAULT_NUM_BLOCKS = 1024
GPU_MEMORY_UTILIZATION = 0.85


def build_model(
    config: ModelConfig, source: ModelSource, dtype: torch.dtype, device: str, load_format: str
) -> LlamaForCausalLM:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = MODEL_REGISTRY[config.architecture](config)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        for param in model.parameters():  # small values keep activations finite
            param.data.normal_(0, 0.02)
    else:
        model.load_weights(iter_weights(source, config))
    return model.eval()


class ModelRunner:
    def __init__(self, engine_config: EngineConfig, model_config: ModelConfig, source: ModelSource):
        self.config = engine_config
        self.model_config = model_config
        self.device = torch.device(engine_config.device)
        self.dtype = engine_config.torch_dtype
        self.block_size = engine_config.cache.block_size
        self.model = build_model(
            model_config, source, self.dtype, engine_config.device, engine_config.load_format
        )
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        self.num_blocks = self._decide_num_blocks()
        self._allocate_kv_cache()
        self.sampler = Sampler()
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not engine_config.enforce_eager:
            longest = engine_config.max_model_len or model_config.max_position_embeddings
            self.graphs = DecodeGraphs(
                self.model,
                engine_config.scheduler.max_num_seqs,
                -(-longest // self.block_size),
                self.device,
            )

    def _bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * layer.num_kv_heads * layer.head_dim * self.dtype.itemsize
        return per_token * self.block_size * len(self.attention_layers)

    def _decide_num_blocks(self) -> int:
        configured = self.config.cache.num_blocks
        if configured is not None:
            return configured
        longest = self.config.max_model_len or self.model_config.max_position_embeddings
        one_sequence = -(-longest // self.block_size)
        if self.device.type != "cuda":
            return max(CPU_DEFAULT_NUM_BLOCKS, one_sequence)
        free, total = torch.cuda.mem_get_info(self.device)
        budget = free - (1 - GPU_MEMORY_UTILIZATION) * total
        return max(one_sequence, int(budget // self._bytes_per_block()))

    def _allocate_kv_cache(self) -> None:
        for layer in self.attention_layers:
            shape = (self.num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        logger.info("KV cache: %d blocks of %d tokens", self.num_blocks, self.block_size)

    def read_blocks(self, block_ids: list[int]) -> list[bytes]:
        """Each block's K and V for every layer, (layers, 2, block_size, kv_heads, D), as bytes."""
        index = torch.tensor(block_ids, device=self.device)
        stacked = torch.stack(
            [
                torch.stack((a.k_cache[index], a.v_cache[index]), dim=1)
                for a in self.attention_layers
            ],
            dim=1,
        )  # (num_blocks, layers, 2, block_size, kv_heads, D)
        raw = stacked.contiguous().view(torch.uint8).reshape(len(block_ids), -1).cpu()
        return [bytes(row.numpy()) for row in raw]

    def write_blocks(self, block_ids: list[int], data: list[bytes]) -> None:
        layer = self.attention_layers[0]
        shape = (len(self.attention_layers), 2, self.block_size, layer.num_kv_heads, layer.head_dim)
        blocks = (
            torch.stack([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data])
            .view(self.dtype)
            .view(len(block_ids), *shape)
            .to(self.device)
        )
        index = torch.tensor(block_ids, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.k_cache[index] = blocks[:, i, 0]
            attn.v_cache[index] = blocks[:, i, 1]

    def _prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        seq_lens: list[int] = []
        cu_seqlens_q = [0]
        for chunk in chunks:
            seq, start, end = chunk.seq, chunk.start, chunk.end
            input_ids.extend(seq.tokens_between(start, end))
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(
                table[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(start, end)
            )
            seq_lens.append(end)
            cu_seqlens_q.append(cu_seqlens_q[-1] + chunk.num_tokens)
        max_blocks = max(len(c.seq.block_table) for c in chunks)
        tables: list[int] = []
        for chunk in chunks:
            table = chunk.seq.block_table
            tables.extend(table)
            tables.extend([0] * (max_blocks - len(table)))
        # Two host-to-device copies per step (one per dtype), then views into them.
        num_tokens, num_seqs = len(input_ids), len(chunks)
        longs = self._to_device(input_ids + positions + slots, torch.int64)
        ints = self._to_device(seq_lens + cu_seqlens_q + tables, torch.int32)
        meta = AttentionMetadata(
            slot_mapping=longs[2 * num_tokens :],
            block_tables=ints[2 * num_seqs + 1 :].view(num_seqs, max_blocks),
            seq_lens=ints[:num_seqs],
            cu_seqlens_q=ints[num_seqs : 2 * num_seqs + 1],
            is_decode=num_tokens == num_seqs,
        )
        return longs[:num_tokens], longs[num_tokens : 2 * num_tokens], meta

    def _to_device(self, values: list[int], dtype: torch.dtype) -> torch.Tensor:
        host = torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    @torch.inference_mode()
    def execute(self, chunks: list[ScheduledChunk]) -> list[tuple[int, TokenLogprob | None]]:
        """Runs one forward pass over every chunk; returns the next token of each chunk that
        completes its sequence's computed tokens (in chunk order)."""
        input_ids, positions, meta = self._prepare(chunks)
        if self.graphs is not None and self.graphs.fits(meta):
            hidden = self.graphs.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta)  # (num_tokens, hidden)
        last_rows = [meta_end - 1 for meta_end in meta.cu_seqlens_q[1:].tolist()]
        sampled = [i for i, c in enumerate(chunks) if c.completes]
        if not sampled:
            return []
        rows = torch.tensor([last_rows[i] for i in sampled], device=self.device)
        logits = self.model.compute_logits(hidden[rows])  # (num_sampled, vocab)
        return self.sampler(logits, [chunks[i].seq for i in sampled])
