"""W8A8 FP8 linear on CUDA (compute capability >= 8.9): y = x @ W^T (+ b) with W stored as
float8_e4m3fn [N, K] plus one fp32 scale per output channel, x quantized per row (token) to
e4m3 on the fly: y[m, n] = sum_k xq[m, k] wq[n, k] * x_scale[m] * w_scale[n]. Decode-sized
inputs (<= gemv.MAX_ROWS rows) go through the GEMV, which quantizes the rows itself and streams
the e4m3 weights (one kernel); more rows quantize x (a few elementwise kernels) and multiply
through `torch._scaled_mm` (cuBLASLt FP8 tensor cores) with row-wise scales.

Everything here is a fixed sequence of device kernels with no host sync, so a decode step
through it is captured in a CUDA graph like any other. cuBLASLt needs K and N to be multiples
of 16; other shapes (tiny test models) take the reference (same quantization, fp32 matmul).

flatout.kernels.reference.linear_w8a8_fp8 is its oracle.
"""

from __future__ import annotations

import torch

from flatout.kernels import reference
from flatout.kernels.gemv import MAX_ROWS, gemv
from flatout.kernels.reference import quantize_fp8_per_token


def linear_w8a8_fp8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:  # x: [M, K], qweight: e4m3 [N, K], scale: fp32 [N] -> [M, N] in x's dtype
    n, k = qweight.shape
    x2 = x.reshape(-1, k)
    if x2.shape[0] <= MAX_ROWS:  # decode: the GEMV quantizes the rows and reads e4m3 weights
        return gemv(x2, qweight, bias, scale=scale).reshape(*x.shape[:-1], n)
    if n % 16 or k % 16:
        return reference.linear_w8a8_fp8(x, qweight, scale, bias)
    xq, x_scale = quantize_fp8_per_token(x2)  # [M, K] e4m3, [M, 1] fp32
    # row-wise scaled FP8 GEMMs give bf16 out; qweight.t() is the column-major [K, N] operand
    y = torch._scaled_mm(
        xq, qweight.t(), scale_a=x_scale, scale_b=scale.view(1, n), out_dtype=torch.bfloat16
    )
    if bias is not None:
        y = y + bias
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
