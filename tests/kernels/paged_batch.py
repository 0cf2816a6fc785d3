"""Random paged KV caches and flattened batches for the attention kernel tests (CPU and GPU)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flatout.layers.attention import AttentionMetadata


@dataclass
class PagedBatch:
    q: torch.Tensor  # [T, H, D]; T may exceed query_start_loc[-1] (padding tokens)
    k_cache: torch.Tensor  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    slot_mapping: torch.Tensor  # [T] int64, -1 for padding tokens
    meta: AttentionMetadata
    scale: float

    @property
    def num_real_tokens(self) -> int:
        return self.meta.query_start_loc_cpu[-1]


def make_paged_batch(
    chunks: list[tuple[int, int]],  # per sequence: (new tokens, context length after the step)
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    bf16_values: bool = False,  # round the random values to bf16 (then store them in `dtype`)
    pad_tokens: int = 0,
    extra_table_width: int = 1,
    seed: int = 0,
) -> PagedBatch:
    """Blocks of each sequence are scattered at random over the cache (never in order), the
    block table is wider than needed, and unused slots hold random values, so a kernel that
    reads past a sequence's context or ignores the table gives a different answer."""
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-seq_len // block_size) for _, seq_len in chunks]
    num_blocks = sum(blocks_needed) + 3
    width = max(blocks_needed, default=0) + extra_table_width
    perm = torch.randperm(num_blocks, generator=gen)
    tables = torch.zeros((len(chunks), width), dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_needed):
        tables[i, :n] = perm[used : used + n]
        used += n

    def rand(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen)
        return (x.bfloat16() if bf16_values else x).to(dtype)

    starts, slots = [0], []
    for i, (n, seq_len) in enumerate(chunks):
        starts.append(starts[-1] + n)
        for pos in range(seq_len - n, seq_len):
            slots.append(int(tables[i, pos // block_size]) * block_size + pos % block_size)
    num_tokens = starts[-1] + pad_tokens
    slots += [-1] * pad_tokens
    seq_lens = [seq_len for _, seq_len in chunks]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        query_start_loc_cpu=starts,
        seq_lens_cpu=seq_lens,
        max_query_len=max((n for n, _ in chunks), default=0),
        max_seq_len=max(seq_lens, default=0),
    )
    return PagedBatch(
        q=rand(num_tokens, num_heads, head_dim).to(device),
        k_cache=rand(num_blocks, block_size, num_kv_heads, head_dim).to(device),
        v_cache=rand(num_blocks, block_size, num_kv_heads, head_dim).to(device),
        query_start_loc=meta.query_start_loc,
        seq_lens=meta.seq_lens,
        block_tables=meta.block_tables,
        slot_mapping=meta.slot_mapping,
        meta=meta,
        scale=head_dim**-0.5,
    )
