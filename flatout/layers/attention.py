"""Paged attention over a flattened token batch.

One forward handles prefill chunks and decodes together: the batch is the concatenation of each
sequence's new tokens (`query_start_loc` marks the boundaries), and every sequence attends to its
cached prefix (read through its block table) plus its own new tokens, causally.

The per-forward metadata lives in an `AttentionMetadata` object that the model runner installs for
the duration of one forward with `forward_context(meta)`; attention layers read it with
`get_forward_context()`. The model code never sees it.

This file holds the plain-PyTorch path: the CPU implementation and the reference that the Triton
kernels are checked against.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """Describes one flattened batch of B sequences and T new tokens."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) per new token
    query_start_loc: torch.Tensor  # [B+1] int32: prefix sums of new tokens per sequence
    seq_lens: torch.Tensor  # [B] int32: tokens in context after this step (cached + new)
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    # host copies, so the reference path loops without device syncs
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

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


def write_kv_cache_ref(
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]; -1 = do not store (padding)
) -> None:
    """Store each new token's K/V at its slot."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention_ref(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, D]
    """Each sequence's new queries attend to all of its context (already written to the cache),
    causally: query j of a chunk of length n sits at position seq_len - n + j."""
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    qsl, lens = meta.query_start_loc_cpu, meta.seq_lens_cpu
    for i in range(meta.num_seqs):
        start, end, seq_len = qsl[i], qsl[i + 1], lens[i]
        if end == start:
            continue
        num_blocks = -(-seq_len // block_size)
        blocks = meta.block_tables[i, :num_blocks].long()
        k = k_cache[blocks].flatten(0, 1)[:seq_len]  # [S, KVH, D]
        v = v_cache[blocks].flatten(0, 1)[:seq_len]
        out[start:end] = _causal_attention(q[start:end], k, v, scale)
    return out


def _causal_attention(
    q: torch.Tensor,  # [N, H, D] the last N positions of the context
    k: torch.Tensor,  # [S, KVH, D]
    v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    n, num_heads, _ = q.shape
    s, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qh = q.transpose(0, 1).float()  # [H, N, D]
    kh = k.transpose(0, 1).float().repeat_interleave(group, dim=0)  # [H, S, D]
    vh = v.transpose(0, 1).float().repeat_interleave(group, dim=0)
    q_pos = torch.arange(s - n, s, device=q.device)[:, None]
    k_pos = torch.arange(s, device=q.device)[None, :]
    mask = k_pos <= q_pos  # [N, S]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.transpose(0, 1).to(q.dtype)


class Attention(nn.Module):
    """Attention of one layer over the paged KV cache.

    The model runner binds `k_cache`/`v_cache` ([num_blocks, block_size, KVH, D]) after the cache
    is allocated; without them (standalone forwards) each sequence attends to its new tokens only.
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
            out = torch.empty_like(q)
            qsl = meta.query_start_loc_cpu
            for i in range(meta.num_seqs):
                s, e = qsl[i], qsl[i + 1]
                out[s:e] = _causal_attention(q[s:e], k[s:e], v[s:e], self.scale)
            return out.view(t, -1)
        if q.is_cuda:
            return self._forward_triton(q, k, v, meta).view(t, -1)
        write_kv_cache_ref(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        out = paged_attention_ref(q, self.k_cache, self.v_cache, meta, self.scale)
        return out.view(t, -1)

    def _forward_triton(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The GPU path: reads only device tensors of `meta` when every query is a decode,
        so decode steps can be captured in CUDA graphs."""
        from flatout import kernels

        assert self.k_cache is not None and self.v_cache is not None
        kernels.write_kv_cache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        if meta.max_query_len == 1:  # q: [B, H, D], one query per sequence
            return kernels.paged_decode_attention(
                q, self.k_cache, self.v_cache, meta.block_tables, meta.seq_lens, self.scale
            )
        return kernels.paged_prefill_attention(
            q, self.k_cache, self.v_cache, meta.query_start_loc, meta.seq_lens,
            meta.block_tables, self.scale, meta.max_query_len,
        )
