"""W4A16: y[M, N] = x[M, K] @ W[N, K]^T (+ b) with 4-bit weights in flatout's layout
(reference.py: two nibbles per uint8 byte along K, fp32 scales [N, G], optional uint8 zero
points [N, G], G groups of K // G inputs).

Decode (up to ROW_BLOCKED_ROWS rows) runs a GEMV like gemv.py's: each program owns BLOCK_N
output columns and streams their packed weight bytes along K, BLOCK_K inputs (BLOCK_K / 2
bytes) a tile; every tile lies inside one scale group, so the nibbles minus their zero point
(integers in -15..15, exact in bf16/fp16) go through `tl.dot` against x's even and odd inputs,
and the fp32 tile sums are scaled by their group's scale before they accumulate. Nothing but the
packed bytes, the scales and x is read. More rows (prefill) dequantize the weight to x's dtype
with a Triton kernel and multiply through cuBLAS.

flatout.kernels.reference.linear_w4a16 (dequantize + matmul in fp32) is the oracle.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatout.kernels._utils import INTERPRET, dot_dtype, dot_precision
from flatout.kernels.gemv import (
    DEFAULT_ROW_BLOCKED,
    INTERPRET_CONFIG,
    INTERPRET_ROW_BLOCKED,
    MAX_ROWS,
    ROW_BLOCKED_ROWS,
    GemvConfig,
    padded_rows,
)
from flatout.kernels.reference import INT4_ZERO, int4_group_size

# GPU tiles, not tuned yet (benchmarks/bench_w4a16_gemv.py measures candidates): a 4-bit tile
# carries half the bytes of an int8 one at the same BLOCK_K; past 16 rows a shorter K tile keeps
# the unpacked nibbles and sums in registers (sm_90, compiled without spills: 102 registers at
# 32 rows, 238 at 64)
DEFAULT = GemvConfig(block_n=64, block_k=256, num_warps=4, num_stages=4)
DEFAULT_WIDE = GemvConfig(block_n=64, block_k=128, num_warps=4, num_stages=3)
MIN_BLOCK_K = 32  # tl.dot needs 16 along K: BLOCK_K / 2 bytes of even, of odd inputs


@triton.jit
def _w4a16_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, y_ptr, M, N, K, GROUP, stride_xm, stride_wn, stride_sn,
    stride_zn, stride_ym,
    HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    M_BLOCKS: tl.constexpr, ZERO: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    # row blocks of one column block are adjacent programs: they read its weights once from HBM
    rows = (pid % M_BLOCKS) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid // M_BLOCKS) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    half_k = K // 2
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # packed byte index: inputs 2j and 2j + 1
        j_mask = j < half_k
        w = tl.load(
            w_ptr + cols[:, None] * stride_wn + j[None, :],
            mask=col_mask[:, None] & j_mask[None, :], other=0,
        ).to(tl.int32)  # [BLOCK_N, BLOCK_K / 2]
        g = k0 // GROUP  # the tile's scale group
        if HAS_ZERO:
            z = tl.load(z_ptr + cols * stride_zn + g, mask=col_mask, other=0).to(tl.int32)
            lo = (w & 15) - z[:, None]
            hi = (w >> 4) - z[:, None]
        else:
            lo = (w & 15) - ZERO
            hi = (w >> 4) - ZERO
        x_rows = x_ptr + rows[:, None] * stride_xm
        x_mask = row_mask[:, None] & j_mask[None, :]
        x_even = tl.load(x_rows + 2 * j[None, :], mask=x_mask, other=0.0)
        x_odd = tl.load(x_rows + 2 * j[None, :] + 1, mask=x_mask, other=0.0)
        part = tl.dot(x_even.to(DOT_DTYPE), tl.trans(lo.to(DOT_DTYPE)),
                      input_precision=PRECISION)
        part = tl.dot(x_odd.to(DOT_DTYPE), tl.trans(hi.to(DOT_DTYPE)), part,
                      input_precision=PRECISION)
        s = tl.load(s_ptr + cols * stride_sn + g, mask=col_mask, other=0.0).to(tl.float32)
        acc += part * s[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=row_mask[:, None] & col_mask[None, :],
    )


@triton.jit
def _w4_dequantize_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr, N, K, GROUP, stride_wn, stride_sn, stride_zn, stride_on,
    HAS_ZERO: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, ZERO: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    mask = (cols < N)[:, None] & (j < K // 2)[None, :]
    w = tl.load(w_ptr + cols[:, None] * stride_wn + j[None, :], mask=mask, other=0).to(tl.int32)
    g_even = (2 * j) // GROUP
    g_odd = (2 * j + 1) // GROUP
    s_row = s_ptr + cols[:, None] * stride_sn
    s_even = tl.load(s_row + g_even[None, :], mask=mask, other=0.0)
    s_odd = tl.load(s_row + g_odd[None, :], mask=mask, other=0.0)
    if HAS_ZERO:
        z_row = z_ptr + cols[:, None] * stride_zn
        z_even = tl.load(z_row + g_even[None, :], mask=mask, other=0).to(tl.int32)
        z_odd = tl.load(z_row + g_odd[None, :], mask=mask, other=0).to(tl.int32)
    else:
        z_even = ZERO
        z_odd = ZERO
    lo = ((w & 15) - z_even).to(tl.float32) * s_even
    hi = ((w >> 4) - z_odd).to(tl.float32) * s_odd
    out_row = out_ptr + cols[:, None] * stride_on
    tl.store(out_row + 2 * j[None, :], lo.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_row + 2 * j[None, :] + 1, hi.to(out_ptr.dtype.element_ty), mask=mask)


def _check(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, k: int
           ) -> int:
    """The group size of a valid 4-bit layout for K inputs."""
    n = qweight.shape[0]
    if qweight.dim() != 2 or qweight.dtype != torch.uint8 or 2 * qweight.shape[1] != k:
        raise ValueError(f"w4a16: qweight must be packed uint8 [N, K / 2] = [{n}, {k // 2}], "
                         f"got {qweight.dtype} {tuple(qweight.shape)}")
    if scale.dim() != 2 or scale.shape[0] != n:
        raise ValueError(f"w4a16: scale must be [N, groups], got {tuple(scale.shape)}")
    if zero is not None and (zero.shape != scale.shape or zero.dtype != torch.uint8):
        raise ValueError(f"w4a16: zero points must be uint8 {tuple(scale.shape)}, got "
                         f"{zero.dtype} {tuple(zero.shape)}")
    return int4_group_size(k, scale.shape[1])


def _tile_k(block_k: int, group: int, groups: int) -> int:
    # every tile inside one group: a power-of-two divisor of the group (any tile per channel)
    if groups == 1:
        return block_k
    while block_k > MIN_BLOCK_K and group % block_k:
        block_k //= 2
    if group % block_k:
        raise ValueError(f"w4a16: group size {group} is not a multiple of {MIN_BLOCK_K}")
    return block_k


def config_for(m: int) -> GemvConfig:
    if INTERPRET:
        return INTERPRET_CONFIG if m <= MAX_ROWS else INTERPRET_ROW_BLOCKED
    if m <= 16:
        return DEFAULT
    return DEFAULT_WIDE if m <= MAX_ROWS else DEFAULT_ROW_BLOCKED


def gemv_w4a16(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
    bias: torch.Tensor | None = None, config: GemvConfig | None = None,
) -> torch.Tensor:  # x: [M, K] -> [M, N]
    """x @ W.T + bias for a 4-bit W, fp32 accumulation, x's dtype out: at most MAX_ROWS rows
    in one program per column block, more only with a config that sets block_m."""
    if x.dim() != 2:
        raise ValueError(f"w4a16 gemv needs x [M, K], got {tuple(x.shape)}")
    m, k = x.shape
    group = _check(qweight, scale, zero, k)
    n = qweight.shape[0]
    cfg = config or config_for(m)
    if m > MAX_ROWS and not cfg.block_m:
        raise ValueError(f"w4a16 gemv takes at most {MAX_ROWS} rows without a block_m, got {m}")
    block_k = _tile_k(cfg.block_k, group, scale.shape[1])
    if x.stride(1) != 1:
        x = x.contiguous()
    qweight, scale = qweight.contiguous(), scale.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_m = cfg.block_m or padded_rows(m)
    m_blocks = triton.cdiv(m, block_m)
    grid = (triton.cdiv(n, cfg.block_n) * m_blocks,)
    z = zero.contiguous() if zero is not None else scale
    _w4a16_gemv_kernel[grid](
        x, qweight, scale, z, bias if bias is not None else scale, y, m, n, k, group,
        x.stride(0), qweight.stride(0), scale.stride(0), z.stride(0), y.stride(0),
        HAS_ZERO=zero is not None, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=cfg.block_n, BLOCK_K=block_k, DOT_DTYPE=dot_dtype(x.dtype),
        PRECISION=dot_precision(x.dtype), M_BLOCKS=m_blocks, ZERO=INT4_ZERO,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return y


def dequantize_w4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """The [N, K] weight in `dtype` (as reference.dequantize_w4)."""
    n, k = qweight.shape[0], 2 * qweight.shape[1]
    group = _check(qweight, scale, zero, k)
    qweight, scale = qweight.contiguous(), scale.contiguous()
    out = torch.empty((n, k), dtype=dtype, device=qweight.device)
    if n == 0 or k == 0:
        return out
    block_n, block_j = (16, 16) if INTERPRET else (32, 128)
    z = zero.contiguous() if zero is not None else scale
    grid = (triton.cdiv(n, block_n), triton.cdiv(k // 2, block_j))
    _w4_dequantize_kernel[grid](
        qweight, scale, z, out, n, k, group, qweight.stride(0), scale.stride(0), z.stride(0),
        out.stride(0), HAS_ZERO=zero is not None, BLOCK_N=block_n, BLOCK_J=block_j,
        ZERO=INT4_ZERO,
    )  # fmt: skip
    return out


def linear_w4a16(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # x: [..., K], qweight: uint8 [N, K / 2], scale / zero: [N, G]
    """x @ W.T + bias for a 4-bit W: the GEMV (weights dequantized in registers) for up to
    ROW_BLOCKED_ROWS rows, in row blocks past MAX_ROWS; more rows dequantize W to x's dtype
    and multiply through cuBLAS."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] <= ROW_BLOCKED_ROWS:
        y = gemv_w4a16(x2, qweight, scale, zero, bias)
    else:
        y = torch.nn.functional.linear(x2, dequantize_w4(qweight, scale, zero, x.dtype), bias)
    return y.reshape(*lead, qweight.shape[0])
