"""CUDA graphs of the decode forward pass, one per batch-size bucket.

A decode step at small batch is a few hundred short kernels; launching them from Python costs
more than running them. Each bucket's forward pass is captured once into static input
buffers; a step copies its inputs in, pads the batch up to the bucket (padding rows write no
KV, slot -1, and attend to nothing, seq_len 0) and replays the graph.
"""

from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.models import LlamaForCausalLM

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.buckets = [b for b in BUCKETS if b < max_num_seqs] + [max_num_seqs]
        size = self.buckets[-1]
        self.max_blocks = max_blocks_per_seq

        def zeros(*shape: int, dtype: torch.dtype) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.input_ids = zeros(size, dtype=torch.int64)
        self.positions = zeros(size, dtype=torch.int64)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.int64, device=device)
        self.block_tables = zeros(size, max_blocks_per_seq, dtype=torch.int32)
        self.seq_lens = zeros(size, dtype=torch.int32)
        self.cu_seqlens_q = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._capture_all()

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            seq_lens=self.seq_lens[:batch],
            cu_seqlens_q=self.cu_seqlens_q[: batch + 1],
            is_decode=True,
        )

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for batch in reversed(self.buckets):  # largest first, so smaller ones reuse its memory
            args = (self.input_ids[:batch], self.positions[:batch], self._meta(batch))
            self.model(*args)  # warm-up: kernel compilation and autotuning happen outside
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[batch] = self.model(*args)
            self.graphs[batch] = graph
        torch.cuda.synchronize()

    def fits(self, meta: AttentionMetadata) -> bool:
        return (
            meta.is_decode
            and meta.seq_lens.shape[0] <= self.buckets[-1]
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        batch = input_ids.shape[0]
        bucket = next(b for b in self.buckets if b >= batch)
        width = meta.block_tables.shape[1]
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.slot_mapping[batch:bucket].fill_(-1)
        self.seq_lens[:batch].copy_(meta.seq_lens)
        self.seq_lens[batch:bucket].zero_()
        self.block_tables[:batch, :width].copy_(meta.block_tables)
        self.block_tables[:batch, width:].zero_()
        self.graphs[bucket].replay()
        return self.outputs[bucket][:batch]
