"""Skinny GEMM (GEMV) for decode: y[M, N] = x[M, K] @ W[N, K]^T (+ b) for M <= 64 rows.

A decode step's linears read every weight byte once for a handful of rows, so the kernel's only
job is to keep HBM busy: each program owns BLOCK_N output columns and streams their weight rows
along K in BLOCK_K tiles (software-pipelined over `num_stages`), the few activation rows ride
along in registers, products go through `tl.dot` (rows padded to 16, 32 or 64) with fp32
accumulation, and the bias is added in the epilogue. No split-K, so no second reduce kernel;
the tile shape is chosen per (N, K, padded rows) from a table tuned on the GPU
(benchmarks/tune_gemv.py), since the best BLOCK_N is the one whose program count fills the
machine in whole waves. Quantized weights (one byte) come with per-channel scales: int8 for
W8A16, e4m3 for W8A8 FP8 (the kernel then quantizes each row of x to e4m3 first).

flatout.kernels.reference.linear (F.linear) is its oracle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flatout.kernels._utils import INTERPRET, dot_dtype, dot_precision, next_pow2

MAX_ROWS = 64
# int8 decode batches up to this many rows: the GEMV in row blocks (measured faster than
# converting the weights for cuBLAS up to 256 rows: benchmarks/results/quant_gemv_h200.md)
ROW_BLOCKED_ROWS = 4 * MAX_ROWS
FP8_MAX: tl.constexpr = tl.constexpr(448.0)  # largest finite e4m3


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    # rows per program (0: all rows, padded, in one program); more rows than one program takes
    # run as row blocks that share each weight tile through L2 (adjacent programs)
    block_m: int = 0
    # W8A8 FP8 only: multiply e4m3 x e4m3 on the tensor cores (else both convert to fp16, exact)
    fp8_dot: bool = False


# (N, K) -> tile shape, tuned on one H200 (benchmarks/results/gemv_h200.md); other shapes take
# DEFAULT. The interpreter takes tiny tiles so CPU tests stay fast.
TUNED: dict[tuple[int, int, int], GemvConfig] = {  # (N, K, padded rows)
    (4608, 4096, 16): GemvConfig(64, 256, 4, 4),  # GLM-4-9B qkv
    (4608, 4096, 32): GemvConfig(64, 256, 4, 4),
    (4608, 4096, 64): GemvConfig(64, 128, 4, 4),
    (4096, 4096, 16): GemvConfig(32, 512, 4, 4),  # o_proj
    (4096, 4096, 32): GemvConfig(32, 256, 4, 4),
    (4096, 4096, 64): GemvConfig(32, 256, 4, 4),
    (27392, 4096, 16): GemvConfig(64, 256, 4, 3),  # gate_up
    (27392, 4096, 32): GemvConfig(64, 256, 4, 3),
    (27392, 4096, 64): GemvConfig(64, 128, 8, 3),
    (4096, 13696, 16): GemvConfig(32, 512, 4, 4),  # down
    (4096, 13696, 32): GemvConfig(32, 512, 4, 4),
    (4096, 13696, 64): GemvConfig(32, 256, 4, 4),
    (151552, 4096, 16): GemvConfig(64, 256, 4, 3),  # LM head
    (151552, 4096, 32): GemvConfig(64, 128, 4, 4),
    (151552, 4096, 64): GemvConfig(64, 128, 4, 3),
}
# (N, K) -> the most rows at which the GEMV still beats cuBLAS there (same table). Shapes not
# measured (other models, tensor-parallel shards) stay on cuBLAS until they are tuned.
GEMV_WINS_UP_TO: dict[tuple[int, int], int] = {
    (4608, 4096): 16,
    (4096, 4096): 48,
    (27392, 4096): 16,
    (4096, 13696): 64,
    (151552, 4096): 64,
}
# int8 weights (W8A16): tiles from benchmarks/results/quant_gemv_h200.md (rows 1 and 32 in one
# program; 128 and 256 rows in row blocks); the LM head's from int8_gemv_h200.md
G = GemvConfig
TUNED_INT8: dict[tuple[int, int, int], GemvConfig] = {
    (4608, 4096, 16): G(64, 512, 4, 4), (4608, 4096, 32): G(64, 512, 4, 3),
    (4608, 4096, 128): G(64, 128, 4, 3, block_m=128), (4608, 4096, 256): G(64, 64, 4, 3, 128),
    (4096, 4096, 16): G(32, 256, 4, 4), (4096, 4096, 32): G(32, 512, 4, 4),
    (4096, 4096, 128): G(64, 128, 4, 3, block_m=64), (4096, 4096, 256): G(64, 128, 8, 3, 128),
    (27392, 4096, 16): G(128, 256, 4, 3), (27392, 4096, 32): G(128, 256, 4, 3),
    (27392, 4096, 128): G(128, 64, 4, 3, block_m=128), (27392, 4096, 256): G(128, 64, 4, 3, 64),
    (4096, 13696, 16): G(32, 512, 4, 4), (4096, 13696, 32): G(32, 512, 4, 4),
    (4096, 13696, 128): G(64, 128, 4, 3, block_m=64), (4096, 13696, 256): G(64, 128, 4, 3, 128),
    (151552, 4096, 16): G(64, 256, 4, 4), (151552, 4096, 32): G(128, 256, 4, 3),
}
# e4m3 weights (W8A8 FP8) at one row (same file); more rows go through torch._scaled_mm
TUNED_FP8: dict[tuple[int, int, int], GemvConfig] = {
    (4608, 4096, 16): G(64, 256, 4, 3), (4096, 4096, 16): G(32, 512, 4, 3),
    (27392, 4096, 16): G(128, 256, 4, 3), (4096, 13696, 16): G(32, 512, 4, 3),
}
# row blocks for more than MAX_ROWS rows of a shape not in the table
DEFAULT_ROW_BLOCKED = GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=3, block_m=64)
DEFAULT = GemvConfig(block_n=32, block_k=256, num_warps=4, num_stages=4)
INTERPRET_CONFIG = GemvConfig(block_n=16, block_k=32, num_warps=1, num_stages=1)
INTERPRET_ROW_BLOCKED = GemvConfig(block_n=16, block_k=32, num_warps=1, num_stages=1, block_m=32)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    QUANTIZE_X: tl.constexpr, FP8_DOT: tl.constexpr, M_BLOCKS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    # row blocks of one column block are adjacent programs: they read its weights once from HBM
    rows = (pid % M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid // M_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if QUANTIZE_X:  # W8A8 FP8: each row's e4m3 scale from its absolute maximum (a first pass
        # over the few rows of x, which stay in L2: every program recomputes the same scales)
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            xa = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :],
                mask=row_mask[:, None] & (ks < K)[None, :], other=0.0,
            ).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(xa), axis=1))
        x_scale = tl.maximum(amax, 1e-12) / FP8_MAX
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        # w: [BLOCK_N, BLOCK_K], contiguous along K
        w = tl.load(
            w_ptr + cols[:, None] * stride_wn + ks[None, :],
            mask=col_mask[:, None] & k_mask[None, :], other=0.0,
        )  # int8 weights convert exactly to bf16/fp16/fp32
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :],
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        if QUANTIZE_X:  # x rounded to e4m3 (exact in fp16 and fp32, like the weights)
            xq = tl.clamp(x.to(tl.float32) / x_scale[:, None], -FP8_MAX, FP8_MAX)
            x = xq.to(tl.float8e4nv)
        if FP8_DOT:
            acc = tl.dot(x, tl.trans(w), acc)
        else:
            acc = tl.dot(
                x.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc, input_precision=PRECISION
            )
    if HAS_SCALE:  # W8A16: per-output-channel scale, applied once to the fp32 sums
        acc *= tl.load(s_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if QUANTIZE_X:
        acc *= x_scale[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


def padded_rows(m: int) -> int:
    return max(16, next_pow2(m))


def config_for(n: int, k: int, m: int, weights: torch.dtype | None = None) -> GemvConfig:
    """The tile for m rows of an [N, K] weight (`weights`: the quantized dtype, if any)."""
    if INTERPRET:
        return INTERPRET_CONFIG if m <= MAX_ROWS else INTERPRET_ROW_BLOCKED
    key = (n, k, padded_rows(m))
    table = {torch.int8: TUNED_INT8, torch.float8_e4m3fn: TUNED_FP8}.get(weights, TUNED)  # type: ignore[arg-type]
    if key in table:
        return table[key]
    return DEFAULT if m <= MAX_ROWS else DEFAULT_ROW_BLOCKED


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:  # x: [M, K], weight: [N, K] -> [M, N]
    """x @ weight.T + bias, fp32 accumulation, x's dtype out: at most MAX_ROWS rows in one
    program per column block, more only with a config that sets block_m.

    With `scale` ([N], fp32) the weight is int8 (W8A16): y = (x @ weight.T) * scale + bias; or
    float8_e4m3fn (W8A8 FP8): each row of x is quantized to e4m3 with its own scale in the
    kernel, as reference.linear_w8a8_fp8 does, and y = (xq @ weight.T) * x_scale * scale + b."""
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"gemv needs x [M, K] and weight [N, K], got {x.shape}, {weight.shape}")
    m, k = x.shape
    n = weight.shape[0]
    cfg = config or config_for(n, k, m, weight.dtype if scale is not None else None)
    if m > MAX_ROWS and not cfg.block_m:
        raise ValueError(f"gemv takes at most {MAX_ROWS} rows without a block_m, got {m}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    allowed = (x.dtype,) if scale is None else (torch.int8, torch.float8_e4m3fn)
    if weight.dtype not in allowed:
        raise ValueError(f"gemv: a {weight.dtype} weight with {x.dtype} input needs "
                         "int8 / e4m3 weights with a scale, or weights of the input's dtype")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    fp8 = weight.dtype == torch.float8_e4m3fn
    block_m = cfg.block_m or padded_rows(m)
    m_blocks = triton.cdiv(m, block_m)
    # e4m3 values (weights, quantized x) are exact in fp16, whose conversion from e4m3 is native
    dtype = torch.float16 if fp8 and not INTERPRET else x.dtype
    grid = (triton.cdiv(n, cfg.block_n) * m_blocks,)
    _gemv_kernel[grid](
        x, weight, scale if scale is not None else weight, bias if bias is not None else weight,
        y, m, n, k, x.stride(0), weight.stride(0), y.stride(0),
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        QUANTIZE_X=fp8, FP8_DOT=fp8 and cfg.fp8_dot and not INTERPRET, M_BLOCKS=m_blocks,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DOT_DTYPE=dot_dtype(dtype), PRECISION=dot_precision(dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """F.linear, through the GEMV for decode-sized 16-bit inputs and cuBLAS otherwise."""
    if (
        x.dim() == 2 and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16)
        and x.shape[0] <= GEMV_WINS_UP_TO.get((weight.shape[0], weight.shape[1]), 0)
    ):  # fmt: skip
        return gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def linear_w8a16(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:  # x: [M, K], qweight: int8 [N, K], scale: fp32 [N]
    """(x @ qweight.T) * scale + bias: the GEMV reads int8 weights for up to MAX_ROWS rows in
    one program per column block, and up to ROW_BLOCKED_ROWS in row blocks that share each
    weight tile (both convert the weights in registers); more rows (prefill) convert the weight
    to x's dtype (exact for int8), multiply through cuBLAS and scale the output channels
    (computed in fp32, in place)."""
    if x.dim() == 2 and x.shape[0] <= ROW_BLOCKED_ROWS:
        return gemv(x, qweight, bias, scale=scale)
    y = torch.nn.functional.linear(x, qweight.to(x.dtype))
    y.mul_(scale)
    return y if bias is None else y.add_(bias)
