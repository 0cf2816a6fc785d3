"""The one place that picks an implementation for every op the layers run.

`ops_for(device)` returns the Triton kernels for a CUDA device and the PyTorch references
(reference.py) for any other; a layer calls it once, when it is built, and keeps what it got, so
no forward decides again and a CPU process never imports triton. Both sets have the same
signatures (those of the Triton launchers).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flatout.kernels import reference

Tensor = torch.Tensor


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable[[Tensor, Tensor, float], Tensor]
    fused_add_rms_norm: Callable[[Tensor, Tensor, Tensor, float], tuple[Tensor, Tensor]]
    # (positions, q, k, cos_sin_cache, head_dim, interleaved): rotates q and k in place
    rotary_embedding: Callable[[Tensor, Tensor, Tensor, Tensor, int, bool], tuple[Tensor, Tensor]]
    silu_and_mul: Callable[[Tensor], Tensor]
    # (k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale); the scales: [] fp32 tensors
    # an fp8 cache's values are divided by (None: 1), ignored by caches of other dtypes
    write_kv_cache: Callable[
        [Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None], None
    ]
    # (q, k_cache, v_cache, query_start_loc, seq_lens, block_tables, scale, max_query_len,
    #  k_scale, v_scale, prefix_lens or None: per sequence, the context tokens every query sees)
    paged_prefill_attention: Callable[
        [Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, float, int, Tensor | None,
         Tensor | None, Tensor | None], Tensor
    ]
    # (q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale, v_scale)
    paged_decode_attention: Callable[
        [Tensor, Tensor, Tensor, Tensor, Tensor, float, Tensor | None, Tensor | None], Tensor
    ]
    # (x, weight, bias): x @ weight.T + bias
    linear: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    # (x, int8 weight [N, K], fp32 scale [N], bias): W8A16, x @ (weight * scale).T + bias
    linear_w8a16: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
    # (x, e4m3 weight [N, K], fp32 scale [N], bias): W8A8 with per-token e4m3 activations
    linear_w8a8_fp8: Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]
    # (x, packed 4-bit weight uint8 [N, K / 2], fp32 scale [N, G], uint8 zero points [N, G] or
    #  None (8), bias): W4A16 with G groups of K / G inputs (reference.py has the layout)
    linear_w4a16: Callable[[Tensor, Tensor, Tensor, Tensor | None, Tensor | None], Tensor]
    # (logits [B, V] fp32, top_k or None, top_p or None, max_top_k, top_k_every_row): the
    # truncated logits (-inf outside each row's kept set), updated in place
    top_k_top_p: Callable[[Tensor, Tensor | None, Tensor | None, int, bool], Tensor]


REFERENCE_OPS = Ops(
    rms_norm=reference.rms_norm,
    fused_add_rms_norm=reference.fused_add_rms_norm,
    rotary_embedding=reference.rotary_embedding,
    silu_and_mul=reference.silu_and_mul,
    write_kv_cache=reference.write_kv_cache,
    paged_prefill_attention=reference.paged_prefill_attention,
    paged_decode_attention=reference.paged_decode_attention,
    linear=reference.linear,
    linear_w8a16=reference.linear_w8a16,
    linear_w8a8_fp8=reference.linear_w8a8_fp8,
    linear_w4a16=reference.linear_w4a16,
    top_k_top_p=reference.top_k_top_p,
)


@functools.cache
def triton_ops() -> Ops:
    """The Triton kernels (imports triton)."""
    from flatout.kernels.activation import silu_and_mul
    from flatout.kernels.decode_attention import paged_decode_attention
    from flatout.kernels.fp8_linear import linear_w8a8_fp8
    from flatout.kernels.gemv import linear, linear_w8a16
    from flatout.kernels.kv_cache import write_kv_cache
    from flatout.kernels.norm import fused_add_rms_norm, rms_norm
    from flatout.kernels.prefill_attention import paged_prefill_attention
    from flatout.kernels.rotary import rotary_embedding
    from flatout.kernels.top_k_top_p import top_k_top_p
    from flatout.kernels.w4a16 import linear_w4a16

    return Ops(
        rms_norm=rms_norm,
        fused_add_rms_norm=fused_add_rms_norm,
        rotary_embedding=rotary_embedding,
        silu_and_mul=silu_and_mul,
        write_kv_cache=write_kv_cache,
        paged_prefill_attention=paged_prefill_attention,
        paged_decode_attention=paged_decode_attention,
        linear=linear,
        linear_w8a16=linear_w8a16,
        linear_w8a8_fp8=linear_w8a8_fp8,
        linear_w4a16=linear_w4a16,
        top_k_top_p=top_k_top_p,
    )


def ops_for(device: torch.device | str | None = None) -> Ops:
    """The ops for tensors on `device` (default: torch's current default device, i.e. where a
    layer built now puts its parameters)."""
    dev = torch.get_default_device() if device is None else torch.device(device)
    return triton_ops() if dev.type == "cuda" else REFERENCE_OPS
