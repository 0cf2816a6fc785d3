"""Rotary position embedding applied in place to q [T, H*D] and k [T, KVH*D].

cos/sin cache layout (the one flatout.layers.rotary.RotaryEmbedding builds): `cos_sin_cache`
[max_position, rotary_dim], row p = cos(p * f_0..f_{R/2-1}) | sin(p * f_0..f_{R/2-1}), where f_i is
the frequency of rotated pair i. Only the first rotary_dim dims of each head turn:
- interleaved (GPT-J; GLM, ChatGLM): pair i = dims (2i, 2i+1)
- half-split (NeoX; Llama, Qwen): pair i = dims (i, i + R/2)
Dims past rotary_dim pass through. Math in fp32, rounded once to the input dtype.

Grid (token, head block): each program rotates HEADS_PER_PROGRAM heads of q or of k in place, so
q and k (views into the fused qkv output) are read and written once, with no copies, and the q and
k heads of a token are turned in parallel (one program per token was latency-bound: 4.9 us per
layer at batch 1 on H200, benchmarks/results/profile_decode_h200.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatout.kernels._utils import next_pow2


@triton.jit
def _rotate_heads(
    x_ptr, cos, sin, head0, num_heads,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):  # fmt: skip
    h = head0 + tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_R)
    if INTERLEAVED:
        first, second = 2 * i, 2 * i + 1
    else:
        first, second = i, i + HALF
    mask = (h < num_heads)[:, None] & (i < HALF)[None, :]  # [H, R/2]
    p1 = x_ptr + h[:, None] * HEAD_DIM + first[None, :]
    p2 = x_ptr + h[:, None] * HEAD_DIM + second[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_sin_ptr,
    stride_qt, stride_kt, stride_cs,
    num_heads, num_kv_heads, q_blocks,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_R: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)  # [0, q_blocks): heads of q; past it: heads of k
    pos = tl.load(positions_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_R)
    row = cos_sin_ptr + pos * stride_cs
    cos = tl.load(row + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]  # [1, R/2]
    sin = tl.load(row + HALF + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
    if blk < q_blocks:
        _rotate_heads(q_ptr + t * stride_qt, cos, sin, blk * BLOCK_H, num_heads,
                      HEAD_DIM, HALF, BLOCK_H, BLOCK_R, INTERLEAVED)
    else:
        _rotate_heads(k_ptr + t * stride_kt, cos, sin, (blk - q_blocks) * BLOCK_H, num_kv_heads,
                      HEAD_DIM, HALF, BLOCK_H, BLOCK_R, INTERLEAVED)


HEADS_PER_PROGRAM = 4


def _check(x: torch.Tensor, head_dim: int, name: str) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] % head_dim:
        raise ValueError(f"{name} must be [T, heads * {head_dim}] with unit last stride")


def rotary_embedding(
    positions: torch.Tensor,  # [T] int
    q: torch.Tensor,  # [T, H*D], rows may be strided (a view into qkv)
    k: torch.Tensor,  # [T, KVH*D]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos | sin
    head_dim: int,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k in place and returns them."""
    _check(q, head_dim, "q")
    _check(k, head_dim, "k")
    if cos_sin_cache.stride(1) != 1:
        raise ValueError("cos_sin_cache must have unit last stride")
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim {rotary_dim} must be even and at most head_dim {head_dim}")
    num_heads, num_kv_heads = q.shape[1] // head_dim, k.shape[1] // head_dim
    if q.shape[0]:
        block_h = min(HEADS_PER_PROGRAM, next_pow2(max(num_heads, num_kv_heads)))
        q_blocks = triton.cdiv(num_heads, block_h)
        _rotary_kernel[(q.shape[0], q_blocks + triton.cdiv(num_kv_heads, block_h))](
            positions, q, k, cos_sin_cache,
            q.stride(0), k.stride(0), cos_sin_cache.stride(0),
            num_heads, num_kv_heads, q_blocks,
            HEAD_DIM=head_dim, HALF=rotary_dim // 2, BLOCK_H=block_h,
            BLOCK_R=next_pow2(rotary_dim // 2), INTERLEAVED=interleaved,
            num_warps=1 if block_h * next_pow2(rotary_dim // 2) <= 128 else 2,
        )  # fmt: skip
    return q, k
