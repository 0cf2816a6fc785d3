"""Store a step's new K/V into the paged cache: token t goes to slot `slot_mapping[t]`, i.e. block
slot // block_size, offset slot % block_size. Slot -1 marks a padding token: nothing is stored.

An fp8 cache (float8_e4m3fn, `--kv-cache-dtype fp8`) holds each value divided by its layer's
per-tensor scale, rounded to nearest even and saturated at +-448, as reference.quantize_kv."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatout.kernels._utils import next_pow2


@triton.jit
def _write_kv_cache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_kt, stride_kh, stride_kd,
    stride_vt, stride_vh, stride_vd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    FP8: tl.constexpr,
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
    if FP8:  # x / scale in IEEE fp32 (div_rn, as the reference divides), saturated at +-448
        k = tl.math.div_rn(k.to(tl.float32), tl.load(k_scale_ptr))
        v = tl.math.div_rn(v.to(tl.float32), tl.load(v_scale_ptr))
        k = tl.minimum(tl.maximum(k, -448.0), 448.0)
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
    kc = k_cache_ptr + block * stride_kcb + offset * stride_kct
    vc = v_cache_ptr + block * stride_vcb + offset * stride_vct
    tl.store(kc + h[:, None] * stride_kch + d[None, :] * stride_kcd,
             k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc + h[:, None] * stride_vch + d[None, :] * stride_vcd,
             v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == torch.float8_e4m3fn


def scale_or_one(scale: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """The [] fp32 scale tensor a kernel reads (a new 1.0 on `like`'s device when None)."""
    if scale is None:
        return torch.ones((), dtype=torch.float32, device=like.device)
    return scale


def write_kv_cache(
    k: torch.Tensor,  # [T, KVH, D], any strides (e.g. a view into the fused qkv output)
    v: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    slot_mapping: torch.Tensor,  # [T] int64 (or int32); -1 = padding, not stored
    k_scale: torch.Tensor | None = None,  # [] fp32: an fp8 cache stores k / k_scale (None: 1)
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store each new token's K/V at its slot, in place; one program per token."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    fp8 = is_fp8(k_cache)
    if fp8 != is_fp8(v_cache):
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    k_scale, v_scale = (scale_or_one(k_scale, k), scale_or_one(v_scale, k)) if fp8 else (k, v)
    block_h, block_d = next_pow2(num_kv_heads), next_pow2(head_dim)
    _write_kv_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_H=block_h, BLOCK_D=block_d, PAGE_SIZE=k_cache.shape[1], FP8=fp8,
        num_warps=max(1, min(8, block_h * block_d // 256)),
    )  # fmt: skip
