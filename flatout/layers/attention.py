"""Paged attention over a flattened token batch.

One forward handles prefill chunks and decodes together: the batch is the concatenation of each
sequence's new tokens (`query_start_loc` marks the boundaries), and every sequence attends to its
cached prefix (read through its block table) plus its own new tokens, causally.

The per-forward metadata lives in an `AttentionMetadata` object that the model runner installs for
the duration of one forward with `forward_context(meta)`; attention layers read it with
`get_forward_context()`. The model code never sees it.

The KV write and the attention itself are flatout.kernels.ops, chosen for the device the layer is
built on: the Triton kernels on CUDA, the PyTorch references elsewhere.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from flatout.kernels import reference
from flatout.kernels.ops import ops_for


@dataclass
class AttentionMetadata:
    """Describes one flattened batch of B sequences and T new tokens."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) per new token
    query_start_loc: torch.Tensor  # [B+1] int32: prefix sums of new tokens per sequence
    seq_lens: torch.Tensor  # [B] int32: tokens in context after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    # host copies, for forwards without a KV cache
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @classmethod
    def for_prefill_without_cache(
        cls, seq_lens: list[int], device: torch.device | str = "cpu"
    ) -> AttentionMetadata:
        """Metadata for whole prompts attending only to themselves (no KV cache bound).

        Used to run a model standalone (tests, profiling forwards)."""
        starts = [0]
        for n in seq_lens:
            starts.append(starts[-1] + n)
        return cls(
            slot_mapping=torch.full((starts[-1],), -1, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.zeros((len(seq_lens), 0), dtype=torch.int32, device=device),
            query_start_loc_cpu=starts,
            seq_lens_cpu=list(seq_lens),
            max_query_len=max(seq_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
        )


_FORWARD_CONTEXT: contextvars.ContextVar[AttentionMetadata | None] = contextvars.ContextVar(
    "flatout_forward_context", default=None
)


@contextlib.contextmanager
def forward_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    """Install `meta` for the attention layers for the duration of one forward."""
    token = _FORWARD_CONTEXT.set(meta)
    try:
        yield meta
    finally:
        _FORWARD_CONTEXT.reset(token)


def get_forward_context() -> AttentionMetadata:
    meta = _FORWARD_CONTEXT.get()
    if meta is None:
        raise RuntimeError("attention called outside forward_context(...)")
    return meta


class Attention(nn.Module):
    """Attention of one layer over the paged KV cache.

    The model runner binds `k_cache`/`v_cache` ([num_blocks, block_size, KVH, D]) after the cache
    is allocated; without them (standalone forwards) each sequence attends to its new tokens only.
    A float8_e4m3fn cache (--kv-cache-dtype fp8) holds K / k_scale and V / v_scale: per-tensor fp32
    scales, 1.0 unless the checkpoint gives them; a cache in the model's dtype ignores them.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} not a multiple of kv heads {num_kv_heads}")
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        # [] fp32 on the layer's device, read by the kernels (no host sync, CUDA-graph safe)
        self.k_scale: torch.Tensor
        self.v_scale: torch.Tensor
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32))
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32))
        self.ops = ops_for()

    def forward(
        self,
        q: torch.Tensor,  # [T, H*D]
        k: torch.Tensor,  # [T, KVH*D]
        v: torch.Tensor,  # [T, KVH*D]
    ) -> torch.Tensor:  # [T, H*D]
        meta = get_forward_context()
        t = q.shape[0]
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.k_cache is None or self.v_cache is None:
            out = reference.varlen_causal_attention(q, k, v, meta.query_start_loc_cpu, self.scale)
            return out.view(t, -1)
        return self._paged(q, k, v, meta, self.k_cache, self.v_cache).view(t, -1)

    def _paged(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
        k_cache: torch.Tensor, v_cache: torch.Tensor,
    ) -> torch.Tensor:
        """Writes the new K/V into the cache, then attends over it. A batch of decodes only reads
        device tensors of `meta` on CUDA, so decode steps can be captured in CUDA graphs."""
        ks, vs = self.k_scale, self.v_scale
        self.ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping, ks, vs)
        if meta.max_query_len == 1:  # q: [B, H, D], one query per sequence
            return self.ops.paged_decode_attention(
                q, k_cache, v_cache, meta.block_tables, meta.seq_lens, self.scale, ks, vs
            )
        return self.ops.paged_prefill_attention(
            q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            self.scale, meta.max_query_len, ks, vs,
        )  # fmt: skip
