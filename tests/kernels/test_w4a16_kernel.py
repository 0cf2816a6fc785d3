"""The W4A16 kernels (GEMV, row-blocked GEMV, dequantize for prefill) against their reference
(dequantize + matmul in fp32) under the Triton interpreter, and the 4-bit layout itself."""

from __future__ import annotations

import pytest
import torch

from flatout.kernels import reference
from flatout.kernels.gemv import GemvConfig
from flatout.kernels.w4a16 import dequantize_w4, gemv_w4a16, linear_w4a16

GEN = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN).bfloat16().float()


def quantized(n: int, k: int, group: int, zero_point: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    q, scale, zero = reference.quantize_w4(randn(n, k), group, zero_point)
    return reference.pack_int4(q), scale, zero


def test_the_layout_packs_two_inputs_per_byte_low_nibble_first() -> None:
    q = torch.tensor([[1, 2, 15, 0], [7, 8, 9, 10]], dtype=torch.uint8)
    packed = reference.pack_int4(q)
    assert packed.tolist() == [[0x21, 0x0F], [0x87, 0xA9]]
    assert torch.equal(reference.unpack_int4(packed), q)
    scale = torch.tensor([[0.5], [2.0]])
    zero = torch.tensor([[1], [8]], dtype=torch.uint8)
    want = torch.tensor([[0.0, 0.5, 7.0, -0.5], [-2.0, 0.0, 2.0, 4.0]])
    assert torch.equal(reference.dequantize_w4(packed, scale, zero), want)
    assert torch.equal(reference.dequantize_w4(packed, scale, None),  # symmetric: zero 8
                       (q.float() - 8) * scale)
    with pytest.raises(ValueError, match="even"):
        reference.pack_int4(torch.zeros(2, 3, dtype=torch.uint8))


@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("group", [0, 32, 64])
def test_round_to_nearest_is_within_half_a_step_per_group(group: int, zero_point: bool) -> None:
    w = randn(8, 128) * torch.logspace(-3, 1, 8)[:, None]
    w[3, :64] = 0.0  # an all-zero group (and a zero half row)
    q, scale, zero = reference.quantize_w4(w, group, zero_point)
    groups = 1 if group == 0 else 128 // group
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and scale.shape == (8, groups)
    assert (zero is not None) == zero_point
    deq = reference.dequantize_w4(reference.pack_int4(q), scale, zero)
    step = scale.repeat_interleave(128 // groups, 1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()
    assert (deq[3, :64] == 0).all()  # zero is representable in every group


@pytest.mark.parametrize("rows", [1, 3, 16, 17, 40])
@pytest.mark.parametrize(("n", "k", "group", "zero_point"), [
    (16, 64, 32, False), (40, 96, 32, True), (33, 128, 64, True), (24, 256, 128, False),
    (40, 70, 0, True), (17, 64, 0, False),  # per channel, K not a multiple of the tile
])
def test_gemv_matches_the_dequantized_reference(rows: int, n: int, k: int, group: int,
                                                zero_point: bool) -> None:
    qw, scale, zero = quantized(n, k, group, zero_point)
    x, b = randn(rows, k), randn(n) if rows % 2 else None
    got = gemv_w4a16(x, qw, scale, zero, b)
    torch.testing.assert_close(got, reference.linear_w4a16(x, qw, scale, zero, b), atol=1e-4,
                               rtol=1e-4)


@pytest.mark.parametrize("rows", [65, 130, 300])  # row blocks; 300: dequantize + matmul
@pytest.mark.parametrize("zero_point", [False, True])
def test_many_rows_match_the_reference(rows: int, zero_point: bool) -> None:
    qw, scale, zero = quantized(40, 96, 32, zero_point)
    x, b = randn(rows, 96), randn(40)
    want = reference.linear_w4a16(x, qw, scale, zero, b)
    torch.testing.assert_close(linear_w4a16(x, qw, scale, zero, b), want, atol=1e-4, rtol=1e-4)
    if rows <= 130:
        cfg = GemvConfig(16, 32, 1, 1, block_m=32)
        torch.testing.assert_close(gemv_w4a16(x, qw, scale, zero, b, config=cfg), want,
                                   atol=1e-4, rtol=1e-4)


def test_dequantize_kernel_and_tile_shapes() -> None:
    qw, scale, zero = quantized(33, 192, 64, True)
    for dtype in (torch.float32, torch.float16):  # (the interpreter rounds bf16 wrongly)
        assert torch.equal(dequantize_w4(qw, scale, zero, dtype),
                           reference.dequantize_w4(qw, scale, zero, dtype))
    # a wide configured tile is narrowed to the group (each tile in one group)
    x = randn(2, 192)
    got = gemv_w4a16(x, qw, scale, zero, None, config=GemvConfig(16, 128, 1, 1))
    torch.testing.assert_close(got, reference.linear_w4a16(x, qw, scale, zero), atol=1e-4,
                               rtol=1e-4)
    # 3-D input through linear_w4a16
    x3 = randn(2, 3, 192)
    torch.testing.assert_close(linear_w4a16(x3, qw, scale, zero),
                               reference.linear_w4a16(x3, qw, scale, zero), atol=1e-4, rtol=1e-4)


def test_bad_layouts_are_refused() -> None:
    qw, scale, zero = quantized(16, 64, 32, True)
    with pytest.raises(ValueError, match="packed uint8"):
        gemv_w4a16(randn(1, 32), qw, scale, zero)
    with pytest.raises(ValueError, match="zero points"):
        gemv_w4a16(randn(1, 64), qw, scale, zero[:, :1])
    with pytest.raises(ValueError, match="groups do not divide"):
        gemv_w4a16(randn(1, 64), qw, torch.ones(16, 3), None)
    qw48, s48, _ = quantized(16, 48, 0, False)
    with pytest.raises(ValueError, match="multiple of 32"):  # groups of 16: no tile fits
        gemv_w4a16(randn(1, 48), qw48, s48.repeat(1, 3), None)
