"""CUDA graphs for decode steps.

A decode step of B sequences (one new token each) is replayed from a graph captured for the
smallest bucket size >= B, with its inputs copied into static buffers and the rows beyond B
padded as empty sequences (seq_len 0, slot -1: nothing is written and their outputs are unused).
Graphs are captured largest first into one shared memory pool, so they together take about the
memory of the largest one. The attention kernels read only device tensors on this path (no host
copies of the metadata), which is what makes the step capturable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from flatout.layers.attention import AttentionMetadata, forward_context

if TYPE_CHECKING:
    from torch.cuda import _POOL_HANDLE

log = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Bucket sizes 1, 2, 4, 8, then steps of 8 up to 256 and 16 beyond, capped at max_num_seqs."""
    sizes = [s for s in (1, 2, 4) if s < max_num_seqs]
    s = 8
    while s < max_num_seqs:
        sizes.append(s)
        s += 8 if s < 256 else 16
    sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    def __init__(
        self,
        forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],  # (ids, positions) -> hidden
        hidden_size: int,
        dtype: torch.dtype,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        device: torch.device,
        position_dims: int = 1,  # 2: positions are [B, 2] (ChatGLM-6B v1)
    ) -> None:
        self.max_seq_len = max_blocks_per_seq * block_size
        self.forward = forward
        self.sizes = capture_sizes(max_num_seqs)
        self.max_bs = self.sizes[-1]
        n, dev = self.max_bs, device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        shape = (n,) if position_dims == 1 else (n, position_dims)
        self.positions = torch.zeros(shape, dtype=torch.long, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros((n, max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.hidden = torch.zeros((n, hidden_size), dtype=dtype, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: _POOL_HANDLE | None = None

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            query_start_loc_cpu=[],  # not read on the graph path
            seq_lens_cpu=[],
            max_query_len=1,
            max_seq_len=self.max_seq_len,  # an upper bound: the real lengths vary per replay
        )

    @torch.inference_mode()
    def capture(self) -> None:
        start = time.monotonic()
        stream = torch.cuda.Stream()
        for bs in reversed(self.sizes):
            meta = self._meta(bs)
            with forward_context(meta):
                # warm up outside the graph (autotuning, lazy allocations), then capture
                self.hidden[:bs] = self.forward(self.input_ids[:bs], self.positions[:bs])
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.hidden[:bs] = self.forward(self.input_ids[:bs], self.positions[:bs])
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode graphs in %.1f s", len(self.graphs), time.monotonic() - start)

    def bucket(self, batch_size: int) -> int | None:
        for s in self.sizes:
            if s >= batch_size:
                return s
        return None

    def replay(
        self,
        input_ids: torch.Tensor,  # [B]
        positions: torch.Tensor,  # [B] or [B, position_dims]
        slot_mapping: torch.Tensor,  # [B]
        seq_lens: torch.Tensor,  # [B]
        block_tables: torch.Tensor,  # [B, W], W <= max_blocks_per_seq
    ) -> torch.Tensor:  # [B, hidden]
        b = input_ids.shape[0]
        bs = self.bucket(b)
        assert bs is not None, "caller checks the batch fits"
        self.input_ids[:b].copy_(input_ids, non_blocking=True)
        self.positions[:b].copy_(positions, non_blocking=True)
        self.slot_mapping[:b].copy_(slot_mapping, non_blocking=True)
        self.seq_lens[:b].copy_(seq_lens, non_blocking=True)
        w = block_tables.shape[1]
        self.block_tables[:b, :w].copy_(block_tables, non_blocking=True)
        if bs > b:  # padding rows: empty sequences
            self.slot_mapping[b:bs].fill_(-1)
            self.seq_lens[b:bs].fill_(0)
        self.graphs[bs].replay()
        return self.hidden[:b]
