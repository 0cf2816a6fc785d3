"""Paged attention for decode: one new query per sequence, flash-decoding over the context.

Grid of the main kernel: (batch, kv head, split). A program loads the whole query-head group of
its KV head ([G, D], G = H / KVH) and walks its share of the context in tiles of BLOCK_N tokens,
so each K/V tile is read from HBM once per group, not once per query head. Each split writes a
partial result (output normalised by its own softmax sum, and the log-sum-exp); a second kernel
merges the splits. With one split the main kernel writes the output directly and no merge runs.

Splits divide each sequence's real length evenly (tile-aligned), so short sequences leave the
high splits empty; the number of splits is chosen from static shapes only, which keeps the call
CUDA-graph capturable (no host syncs, no data-dependent shapes).

An fp8 cache (float8_e4m3fn) is read as it is stored, one byte per value, and converted to the
dot's operand type in registers (exact: e4m3 values are bf16/fp16 values); the per-tensor scales
are folded in, k_scale into the softmax scale and v_scale into the output, so no tile is scaled.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flatout.kernels._utils import dot_dtype, dot_precision, next_pow2, num_sms
from flatout.kernels.kv_cache import is_fp8, scale_or_one

BLOCK_N = 64  # context tokens per tile
MAX_SPLITS = 64
MIN_TOKENS_PER_SPLIT = 64  # of the widest context the block table can hold: one tile per split
PROGRAMS_PER_SM = 4  # one program per SM leaves HBM idle; about four keep it busy (H200 sweep)


def decode_num_splits(
    batch: int, num_kv_heads: int, max_blocks: int, block_size: int, device: torch.device
) -> int:
    """Splits per sequence, from static shapes: about PROGRAMS_PER_SM (batch x kv head x split)
    programs per SM, no more than the widest context (max_blocks * block_size) can use; a power
    of two (rounded down) so that few variants of the merge kernel get compiled.

    Measured on H200 at GLM-4-9B's shapes (benchmarks/results/tune_decode_long_h200.md): with one
    program per SM a 64 x 8k batch read its KV at 3.0 TB/s, with four at 3.9."""
    programs = max(batch * num_kv_heads, 1)
    want = max(1, PROGRAMS_PER_SM * num_sms(device) // programs)
    want = 1 << (want.bit_length() - 1)  # round down to a power of two
    by_context = triton.cdiv(max_blocks * block_size, MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, next_pow2(by_context), MAX_SPLITS))


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr,
    out_ptr, part_o_ptr, part_lse_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    num_splits,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bt,
    stride_ob, stride_oh, stride_od,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, DIRECT_OUT: tl.constexpr,
    FP8: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head = kvh * GROUP + g  # [G]
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(
        q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :] * stride_qd,
        mask=g_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(DOT_DTYPE)  # [G, D]
    if FP8:  # q . (k8 * k_scale) = (q . k8) * k_scale
        qk_scale = qk_scale * tl.load(k_scale_ptr)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile in range(start, end, BLOCK_N):
        tok = tile + tl.arange(0, BLOCK_N)  # [N] context positions
        t_mask = tok < end
        page = tl.load(block_tables_ptr + b * stride_bt + tok // PAGE_SIZE, mask=t_mask, other=0)
        k_row = page.to(tl.int64) * stride_kb + (tok % PAGE_SIZE) * stride_kt + kvh * stride_kh
        v_row = page.to(tl.int64) * stride_vb + (tok % PAGE_SIZE) * stride_vt + kvh * stride_vh
        kv_mask = t_mask[None, :] & d_mask[:, None]
        k = tl.load(k_cache_ptr + k_row[None, :] + d[:, None] * stride_kd, mask=kv_mask, other=0.0)
        s = tl.dot(q, k.to(DOT_DTYPE), input_precision=DOT_PRECISION) * qk_scale  # [G, N]
        s = tl.where(t_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile holds a real token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_cache_ptr + v_row[:, None] + d[None, :] * stride_vd,
            mask=t_mask[:, None] & d_mask[None, :], other=0.0,
        )  # [N, D]
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    # An empty split (or a padding row, seq_len 0) has l_i == 0: output 0, lse -inf.
    has_tokens = l_i > 0
    o = acc / tl.where(has_tokens, l_i, 1.0)[:, None]
    if FP8:  # sum p (v8 * v_scale) = (sum p v8) * v_scale
        o = o * tl.load(v_scale_ptr)
    out_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT_OUT:
        o_ptrs = out_ptr + b * stride_ob + head[:, None] * stride_oh + d[None, :] * stride_od
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # part_o: [B, H, S, D] and part_lse: [B, H, S], both contiguous fp32
        row = (b * GROUP * tl.num_programs(1) + head) * num_splits + split  # [G]
        lse = tl.where(has_tokens, m_i + tl.log2(tl.where(has_tokens, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=out_mask)


@triton.jit
def _decode_merge_kernel(
    part_o_ptr, part_lse_ptr, out_ptr,
    num_splits,
    stride_ob, stride_oh, stride_od,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    d_mask = d < HEAD_DIM
    row = (b * tl.num_programs(1) + h) * num_splits + s  # [S]
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :],
                mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [S, D]
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max > float("-inf"), lse_max, 0.0)  # all splits empty: seq_len 0
    w = tl.exp2(lse - lse_max)  # [S]; 0 for empty splits
    total = tl.sum(w, 0)
    merged = tl.sum(w[:, None] * o, 0) / tl.where(total > 0, total, 1.0)  # seq_len 0 -> 0
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d * stride_od,
             merged.to(out_ptr.dtype.element_ty), mask=d_mask)


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the new token
    scale: float,
    k_scale: torch.Tensor | None = None,  # [] fp32, of an fp8 cache (None: 1)
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,  # [B, H, D]
    num_splits: int | None = None,
    block_n: int = BLOCK_N,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:  # [B, H, D]
    """Attention of each sequence's single new query over its whole cached context.

    The new token's K/V must already be in the cache. Rows with seq_len 0 (batch padding) get
    zeros. `num_splits` defaults to `decode_num_splits(...)` of the static shapes. An fp8 cache
    holds K / k_scale and V / v_scale (kv_cache.write_kv_cache)."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} kv heads")
    if out is None:
        out = torch.empty((batch, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = decode_num_splits(
            batch, num_kv_heads, block_tables.shape[1], block_size, q.device
        )
    group = num_heads // num_kv_heads
    fp8 = is_fp8(k_cache)
    if fp8 != is_fp8(v_cache):
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    k_scale, v_scale = (scale_or_one(k_scale, q), scale_or_one(v_scale, q)) if fp8 else (q, q)
    direct = num_splits == 1
    if direct:
        part_o = part_lse = out  # unused
    else:
        part_o = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32,
                             device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32,
                               device=q.device)
    block_d = max(16, next_pow2(head_dim))
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens,
        out, part_o, part_lse, k_scale, v_scale,
        scale * math.log2(math.e),
        num_splits,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        block_tables.stride(0), *out.stride(),
        GROUP=group, BLOCK_G=max(16, next_pow2(group)),
        HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE_SIZE=block_size, BLOCK_N=block_n,
        DOT_DTYPE=dot_dtype(q.dtype), DOT_PRECISION=dot_precision(q.dtype), DIRECT_OUT=direct,
        FP8=fp8, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if not direct:
        _decode_merge_kernel[(batch, num_heads)](
            part_o, part_lse, out, num_splits, *out.stride(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=next_pow2(num_splits), num_warps=4,
        )  # fmt: skip
    return out
