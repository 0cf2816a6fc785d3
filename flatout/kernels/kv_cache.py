"""Store a step's new K/V into the paged cache: token t goes to slot `slot_mapping[t]`, i.e. block
slot // block_size, offset slot % block_size. Slot -1 marks a padding token: nothing is stored."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatout.kernels._utils import next_pow2


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t).to(tl.int64)
    if slot < 0:
        return
    block = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]  # [KVH, D]
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :] * stride_kd, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :] * stride_vd, mask=mask)
    kc = k_cache_ptr + block * stride_kcb + offset * stride_kct
    vc = v_cache_ptr + block * stride_vcb + offset * stride_vct
    tl.store(kc + h[:, None] * stride_kch + d[None, :] * stride_kcd,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc + h[:, None] * stride_vch + d[None, :] * stride_vcd,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    k: torch.Tensor,  # [T, KVH, D], any strides (e.g. a view into the fused qkv output)
    v: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    slot_mapping: torch.Tensor,  # [T] int64 (or int32); -1 = padding, not stored
) -> None:
    """Store each new token's K/V at its slot, in place; one program per token."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    block_h, block_d = next_pow2(num_kv_heads), next_pow2(head_dim)
    _write_kv_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=block_h, BLOCK_D=block_d, PAGE_SIZE=k_cache.shape[1],
        num_warps=max(1, min(8, block_h * block_d // 256)),
    )  # fmt: skip
