"""W8A8 FP8 linear on CUDA (compute capability >= 8.9): y = x @ W^T (+ b) with W stored as
float8_e4m3fn [N, K] plus one fp32 scale per output channel, x quantized per row (token) to
e4m3 on the fly: y[m, n] = sum_k xq[m, k] wq[n, k] * x_scale[m] * w_scale[n]. Inputs of up
to GEMV_ROWS rows go through the GEMV, which quantizes the rows itself and streams the e4m3
weights (one kernel; measured faster than _scaled_mm at one row, slower at 32:
benchmarks/results/quant_gemv_h200.md); more rows quantize x (one kernel: each row's absolute
maximum, then the scaled e4m3 values) and multiply through `torch._scaled_mm` (cuBLASLt FP8
tensor cores) with row-wise scales.

Everything here is a fixed sequence of device kernels with no host sync, so a decode step
through it is captured in a CUDA graph like any other. cuBLASLt needs K and N to be multiples
of 16; other shapes (tiny test models) take the reference (same quantization, fp32 matmul).

flatout.kernels.reference.linear_w8a8_fp8 is its oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatout.kernels import reference
from flatout.kernels.gemv import FP8_MAX, MAX_ROWS, gemv

BLOCK = 1024  # values of a row per pass
GEMV_ROWS = 16


@triton.jit
def _quantize_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    x_row = x_ptr + row * stride_x
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK):  # pass 1: the row's absolute maximum
        ks = k0 + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FP8_MAX
    tl.store(s_ptr + row, scale)
    for k0 in range(0, K, BLOCK):  # pass 2 (the row is in L2 now): x / scale to e4m3
        ks = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_row + ks, mask=ks < K, other=0.0).to(tl.float32)
        q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX).to(tl.float8e4nv)
        tl.store(q_ptr + row * stride_q + ks, q, mask=ks < K)


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """reference.quantize_fp8_per_token in one kernel: x [M, K] -> (e4m3 [M, K], fp32 [M, 1])."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        _quantize_rows_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=BLOCK,
                                    num_warps=4)
    return q, s


def linear_w8a8_fp8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:  # x: [M, K], qweight: e4m3 [N, K], scale: fp32 [N] -> [M, N] in x's dtype
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    tileable = n % 16 == 0 and k % 16 == 0
    if x2.shape[0] <= (GEMV_ROWS if tileable else MAX_ROWS):  # the GEMV quantizes the rows
        return gemv(x2, qweight, bias, scale=scale).reshape(*x.shape[:-1], n)
    if not tileable:
        return reference.linear_w8a8_fp8(x, qweight, scale, bias)
    xq, x_scale = quantize_fp8_per_token(x2)  # [M, K] e4m3, [M, 1] fp32
    # row-wise scaled FP8 GEMMs give bf16 out; qweight.t() is the column-major [K, N] operand
    y = torch._scaled_mm(
        xq, qweight.t(), scale_a=x_scale, scale_b=scale.view(1, n), out_dtype=torch.bfloat16
    )
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
