"""Paged attention for prefill/extend over a flattened varlen batch (chunked prefill, prefix hits).

Each sequence brings a chunk of n new queries; query j sits at position seq_len - n + j and
attends causally to the whole context in the cache (the cached prefix plus the chunk itself, whose
K/V were written before the call).

Grid: (query tile, sequence, kv head). A program takes BLOCK_Q consecutive queries of one
sequence together with all G query heads of one KV head, as one [BLOCK_Q * G, D] matrix whose row
r is (query r // G, head r % G): every K/V tile is loaded once for the whole group, and a decode
row mixed into the batch (n = 1) still fills G rows of the tensor-core tile instead of one.

An fp8 cache is converted to the dot's operand type in registers, k_scale folded into the softmax
scale and v_scale into the output, as in decode_attention.py.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flatout.kernels._utils import dot_dtype, dot_precision, next_pow2
from flatout.kernels.kv_cache import is_fp8, scale_or_one

BLOCK_M = 128  # rows (query x head) per program; half for fp32 (CUDA-core dots, many registers)
BLOCK_N = 64  # context tokens per tile


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    stride_qt, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_ot, stride_oh, stride_od,
    stride_bt,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, FP8: tl.constexpr,
):  # fmt: skip
    q_tile = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + b)
    num_new = tl.load(query_start_loc_ptr + b + 1) - q_start
    if q_tile * BLOCK_Q >= num_new:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    first_pos = seq_len - num_new  # position of the chunk's first query

    r = tl.arange(0, BLOCK_Q * BLOCK_G)
    qi = q_tile * BLOCK_Q + r // BLOCK_G  # [M] query index within the chunk
    g = r % BLOCK_G
    head = kvh * GROUP + g
    row_mask = (qi < num_new) & (g < GROUP)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM
    q_off = (q_start + qi).to(tl.int64) * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + d[None, :] * stride_qd,
                mask=row_mask[:, None] & d_mask[None, :], other=0.0).to(DOT_DTYPE)  # [M, D]
    if FP8:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    # Rows past the chunk get positions >= seq_len: they see every key < kv_end and stay finite.
    q_pos = first_pos + qi  # [M]
    # Keys that the tile's last query can see; key 0 is visible to every row, so the running max
    # is finite after the first tile and no row ever computes exp2(-inf - -inf).
    kv_end = tl.minimum(seq_len, first_pos + (q_tile + 1) * BLOCK_Q)

    m_i = tl.full([BLOCK_Q * BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_G, BLOCK_D], tl.float32)
    for tile in range(0, kv_end, BLOCK_N):
        tok = tile + tl.arange(0, BLOCK_N)  # [N] context positions
        t_mask = tok < kv_end
        page = tl.load(block_tables_ptr + b * stride_bt + tok // PAGE_SIZE, mask=t_mask, other=0)
        k_row = page.to(tl.int64) * stride_kb + (tok % PAGE_SIZE) * stride_kt + kvh * stride_kh
        v_row = page.to(tl.int64) * stride_vb + (tok % PAGE_SIZE) * stride_vt + kvh * stride_vh
        k = tl.load(k_cache_ptr + k_row[None, :] + d[:, None] * stride_kd,
                    mask=t_mask[None, :] & d_mask[:, None], other=0.0)  # [D, N]
        s = tl.dot(q, k.to(DOT_DTYPE), input_precision=DOT_PRECISION) * qk_scale  # [M, N]
        visible = (tok[None, :] <= q_pos[:, None]) & t_mask[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + v_row[:, None] + d[None, :] * stride_vd,
                    mask=t_mask[:, None] & d_mask[None, :], other=0.0)  # [N, D]
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    if FP8:
        o = o * tl.load(v_scale_ptr)
    o_off = (q_start + qi).to(tl.int64) * stride_ot + head * stride_oh
    tl.store(out_ptr + o_off[:, None] + d[None, :] * stride_od, o.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    query_start_loc: torch.Tensor,  # [B+1] int32
    seq_lens: torch.Tensor,  # [B] int32, context length including the chunk
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    scale: float,
    max_query_len: int,  # host int: longest chunk in the batch (sizes the grid)
    k_scale: torch.Tensor | None = None,  # [] fp32, of an fp8 cache (None: 1)
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, H, D]
    """Causal attention of each sequence's new chunk over its whole paged context.

    Tokens not covered by any sequence's chunk (batch padding past query_start_loc[-1]) are left
    unwritten in the output."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} kv heads")
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    batch = seq_lens.shape[0]
    if batch == 0 or max_query_len == 0:
        return out
    group = num_heads // num_kv_heads
    fp8 = is_fp8(k_cache)
    if fp8 != is_fp8(v_cache):
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    k_scale, v_scale = (scale_or_one(k_scale, q), scale_or_one(v_scale, q)) if fp8 else (q, q)
    block_g = next_pow2(group)
    dot_type = dot_dtype(q.dtype)
    block_m = BLOCK_M if dot_type != tl.float32 or head_dim <= 64 else BLOCK_M // 2
    block_q = max(1, block_m // block_g)
    block_q = max(block_q, 16 // block_g)  # tl.dot needs at least 16 rows
    grid = (triton.cdiv(max_query_len, block_q), batch, num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, k_scale, v_scale,
        scale * math.log2(math.e),
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *out.stride(),
        block_tables.stride(0),
        GROUP=group, BLOCK_G=block_g, BLOCK_Q=block_q,
        HEAD_DIM=head_dim, BLOCK_D=max(16, next_pow2(head_dim)),
        PAGE_SIZE=block_size, BLOCK_N=BLOCK_N,
        DOT_DTYPE=dot_type, DOT_PRECISION=dot_precision(q.dtype), FP8=fp8,
        num_warps=8 if block_q * block_g >= 128 else 4, num_stages=2,
    )  # fmt: skip
    return out
