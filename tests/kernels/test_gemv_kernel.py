"""The decode GEMV against its reference (F.linear) under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from flatout.kernels import reference
from flatout.kernels.gemv import GEMV_WINS_UP_TO, MAX_ROWS, GemvConfig, gemv, linear

GEN = torch.Generator().manual_seed(0)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN).bfloat16().to(dtype)


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,k", [(16, 32), (40, 70), (33, 96)])  # ragged N and K are masked
def test_gemv_matches_reference(rows: int, bias: bool, n: int, k: int) -> None:
    x, w = randn(rows, k), randn(n, k)
    b = randn(n) if bias else None
    torch.testing.assert_close(gemv(x, w, b), reference.linear(x, w, b), atol=1e-4, rtol=1e-4)


def test_gemv_bf16_and_strided_input() -> None:
    x = randn(4, 128, dtype=torch.bfloat16)[:, ::2]  # non-contiguous K
    w = randn(48, 64, dtype=torch.bfloat16)
    got = gemv(x, w, None, config=GemvConfig(16, 32, 1, 1))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference.linear(x.float(), w.float()), atol=2e-2,
                               rtol=2e-2)


def test_linear_takes_the_gemv_only_where_it_was_measured_to_win(monkeypatch) -> None:
    from flatout.kernels import gemv as gemv_module

    calls: list[tuple[int, int, int]] = []

    def recording(x, weight, bias=None, config=None, scale=None):
        calls.append((x.shape[0], *weight.shape))
        return reference.linear(x, weight, bias)

    monkeypatch.setattr(gemv_module, "gemv", recording)
    qkv = torch.zeros(4608, 4096, dtype=torch.bfloat16)  # measured: GEMV up to 16 rows
    for rows in (1, 16, 17):
        linear(torch.zeros(rows, 4096, dtype=torch.bfloat16), qkv)
    linear(torch.zeros(2, 4096), qkv.float())  # fp32: cuBLAS
    linear(torch.zeros(1, 32, dtype=torch.bfloat16), randn(24, 32, dtype=torch.bfloat16))
    assert calls == [(1, 4608, 4096), (16, 4608, 4096)]  # 17 rows, fp32, unmeasured: cuBLAS
    assert GEMV_WINS_UP_TO[(4608, 4096)] == 16


def test_gemv_refuses_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at most"):  # one program for every row: 64 at most
        gemv(randn(MAX_ROWS + 1, 8), randn(16, 8), config=GemvConfig(16, 32, 1, 1))
    with pytest.raises(ValueError, match="weight"):
        gemv(randn(2, 8), randn(16, 9))


@pytest.mark.parametrize("rows", [1, 5, 16, 40, 70, 300])  # 70: GEMV chunks; 300: prefill
@pytest.mark.parametrize("bias", [False, True])
def test_int8_gemv_matches_dequantized_reference(rows: int, bias: bool) -> None:
    from flatout.kernels.gemv import linear_w8a16

    w = randn(48, 96)
    q, scale = reference.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    # per-channel symmetric: every weight within half a step of its dequantized value
    assert ((q.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6).all()
    x = randn(rows, 96)
    b = randn(48) if bias else None
    expected = reference.linear_w8a16(x, q, scale, b)
    torch.testing.assert_close(gemv(x, q, b, scale=scale) if rows <= MAX_ROWS
                               else linear_w8a16(x, q, scale, b), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(linear_w8a16(x, q, scale, b), expected, atol=1e-4, rtol=1e-4)


def test_int8_gemv_needs_its_scale() -> None:
    q, _ = reference.quantize_int8(randn(16, 32))
    with pytest.raises(ValueError, match="scale"):
        gemv(randn(1, 32), q)


@pytest.mark.parametrize("rows", [1, 5, 16, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_gemv_quantizes_rows_as_the_w8a8_reference(rows: int, bias: bool) -> None:
    w = randn(48, 96)
    q, scale = reference.quantize_fp8(w)
    x = randn(rows, 96) * torch.logspace(-2, 1, rows)[:, None]  # rows of very different scales
    if rows > 1:
        x[-1] = 0.0  # an all-zero row: scale floor, output = bias
    b = randn(48) if bias else None
    expected = reference.linear_w8a8_fp8(x, q, scale, b)
    got = gemv(x, q, b, scale=scale)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    # W8A8 is not W8A16: the dequantized-weight product differs by the activations' rounding
    w8a16 = reference.linear(x, q.float() * scale[:, None], b)
    assert not torch.allclose(got[:1], w8a16[:1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows", [65, 130])
@pytest.mark.parametrize("weights", ["int8", "fp8", "bf16"])
def test_row_blocked_gemv_matches_the_reference(rows: int, weights: str) -> None:
    """More rows than one program takes: row blocks (block_m) over the same column blocks."""
    w, x, b = randn(40, 96), randn(rows, 96), randn(40)
    cfg = GemvConfig(16, 32, 1, 1, block_m=32)
    if weights == "bf16":
        torch.testing.assert_close(gemv(x, w, b, config=cfg), reference.linear(x, w, b),
                                   atol=1e-4, rtol=1e-4)
        return
    quantize, ref = ((reference.quantize_int8, reference.linear_w8a16) if weights == "int8"
                     else (reference.quantize_fp8, reference.linear_w8a8_fp8))
    q, scale = quantize(w)
    torch.testing.assert_close(gemv(x, q, b, config=cfg, scale=scale), ref(x, q, scale, b),
                               atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("rows,k", [(3, 96), (5, 2500)])  # 2500: more than one pass per row
def test_fused_fp8_row_quantize_matches_the_reference(rows: int, k: int) -> None:
    from flatout.kernels.fp8_linear import quantize_fp8_per_token

    x = randn(rows, k) * 3
    x[1] = 0  # an all-zero row: a tiny scale and zeros
    q, s = quantize_fp8_per_token(x)
    q_ref, s_ref = reference.quantize_fp8_per_token(x)
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close((q.float() * s), (q_ref.float() * s_ref), atol=0, rtol=1 / 8)
