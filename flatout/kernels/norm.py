"""RMSNorm, plain and fused with the residual add: y = w * (x / sqrt(mean(x^2) + eps)).

Rounding follows flatout.kernels.reference.rms_norm exactly: the residual sum is rounded to the
input dtype (it is the next residual), normalised in fp32, rounded to the input dtype, then
multiplied by the weight and rounded again. One program per row: one read of x and the residual,
one write of each output."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatout.kernels._utils import next_pow2


@triton.jit
def _normalise(x, w, hidden, eps, dtype: tl.constexpr):
    """w * x / sqrt(mean(x^2) + eps) for one fp32 row `x` (masked lanes 0) and fp32 weights,
    rounded to `dtype` before and after the weight product, as RMSNorm rounds."""
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / hidden + eps)
    y = (x * inv_rms).to(dtype).to(tl.float32)
    return (w * y).to(dtype)


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    stride_x, stride_r, stride_o, stride_ro,
    hidden, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(residual_out_ptr.dtype.element_ty)  # the stored residual, rounded
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
        x = x.to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = _normalise(x, w, hidden, eps, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_o + cols, y, mask=mask)


def _launch(x, residual, weight, eps):
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)  # [N, hidden]
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if residual is None:
        r2 = r_out = out  # unused
    else:
        r2 = residual.reshape(-1, hidden)
        if r2.stride(1) != 1:
            r2 = r2.contiguous()
        r_out = torch.empty_like(out)
    block = next_pow2(hidden)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out, r_out,
            x2.stride(0), r2.stride(0), out.stride(0), r_out.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block,
            num_warps=min(16, max(1, block // 512)),
        )  # fmt: skip
    return out.view(x.shape), r_out.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [..., hidden], weight: [hidden] -> [..., hidden] in x's dtype."""
    return _launch(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is the next layer's residual.
    x, residual: [..., hidden] of one dtype; new tensors are returned, the inputs are untouched."""
    return _launch(x, residual, weight, eps)
