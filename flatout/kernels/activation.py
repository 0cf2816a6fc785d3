"""SiLU-and-mul (SwiGLU): x = gate | up along the last dim -> silu(gate) * up.

One read of x and one write of the result per token; computed in fp32 and rounded once, as
flatout.kernels.reference.silu_and_mul."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, inter, stride_xt, stride_ot, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + t * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * stride_xt + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + t * stride_ot + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # x: [T, 2I] -> [T, I]
    """silu(x[:, :I]) * x[:, I:], computed in fp32, returned in x's dtype."""
    num_tokens, width = x.shape
    if width % 2:
        raise ValueError(f"silu_and_mul needs an even last dim, got {width}")
    if x.stride(1) != 1:
        x = x.contiguous()
    inter = width // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens:
        grid = (num_tokens, triton.cdiv(inter, BLOCK))
        _silu_and_mul_kernel[grid](x, out, inter, x.stride(0), out.stride(0), BLOCK=BLOCK)
    return out
