"""Norm, rotary and activation kernels against their references and flatout's layers, under the
Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from flatout.kernels import reference
from flatout.kernels.activation import silu_and_mul
from flatout.kernels.norm import fused_add_rms_norm, rms_norm
from flatout.kernels.rotary import rotary_embedding
from flatout.layers.activation import SiluAndMul
from flatout.layers.norm import RMSNorm
from flatout.layers.rotary import RotaryEmbedding

GEN = torch.Generator().manual_seed(0)


def randn(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN).bfloat16().to(dtype)  # bf16-representable values


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    if actual.dtype == torch.bfloat16:  # the interpreter truncates bf16 stores: an ulp or two
        torch.testing.assert_close(actual.float(), expected.float(), atol=2e-2, rtol=2e-2)
    else:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [80, 1000])
def test_rms_norm_matches_layer(dtype, hidden):
    layer = RMSNorm(hidden, eps=1e-5)
    layer.weight.data = randn(hidden) + 1
    layer.to(dtype)
    x, residual = randn(7, hidden, dtype=dtype) * 3, randn(7, hidden, dtype=dtype)
    w = layer.weight.data
    close(rms_norm(x, w, layer.eps), layer(x))
    close(reference.rms_norm(x, w, layer.eps), layer(x))
    normed, summed = fused_add_rms_norm(x, residual, w, layer.eps)
    normed_ref, summed_ref = reference.fused_add_rms_norm(x, residual, w, layer.eps)
    layer_normed, layer_summed = layer.forward_with_residual(x, residual)
    close(normed, normed_ref)
    close(summed, summed_ref)
    close(normed_ref, layer_normed)
    assert torch.equal(summed_ref, layer_summed)


def test_rms_norm_keeps_leading_dims_and_inputs():
    x, residual, w = randn(2, 3, 64), randn(2, 3, 64), randn(64)
    x0, r0 = x.clone(), residual.clone()
    normed, summed = fused_add_rms_norm(x, residual, w, 1e-6)
    assert normed.shape == summed.shape == (2, 3, 64)
    assert torch.equal(x, x0) and torch.equal(residual, r0)
    close(summed, x + residual)


# (heads, kv heads, head dim, rotary dim, interleaved): GLM (half of each head, pairs), NeoX full
# and partial, head dim 80 with a non-power-of-two rotary half
ROTARY = [(6, 2, 64, 32, True), (6, 2, 64, 64, False), (3, 1, 80, 40, False),
          (4, 4, 80, 80, True), (5, 1, 32, 16, False)]  # fmt: skip


@pytest.mark.parametrize("heads,kv_heads,head_dim,rotary_dim,interleaved", ROTARY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_matches_layer(heads, kv_heads, head_dim, rotary_dim, interleaved, dtype):
    rope = RotaryEmbedding(head_dim, rotary_dim, max_position=64, base=10000.0,
                           interleaved=interleaved)  # fmt: skip
    t = 9
    positions = torch.tensor([0, 5, 63, 1, 2, 2, 17, 40, 8])
    qkv = randn(t, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    q, k = qkv[:, : heads * head_dim], qkv[:, heads * head_dim : (heads + kv_heads) * head_dim]
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    q_before = q.clone()
    q_layer, k_layer = rope(positions, q.clone(), k.clone())

    qkv_ref = qkv.clone()
    q_ref, k_ref = reference.rotary_embedding(
        positions, qkv_ref[:, : heads * head_dim],
        qkv_ref[:, heads * head_dim : (heads + kv_heads) * head_dim],
        rope.cos_sin_cache, head_dim, interleaved,
    )  # fmt: skip
    out_q, out_k = rotary_embedding(positions, q, k, rope.cos_sin_cache, head_dim, interleaved)
    assert out_q.data_ptr() == q.data_ptr()  # in place, in the fused qkv buffer
    close(q, q_ref)
    close(k, k_ref)
    close(q_ref, q_layer)
    close(k_ref, k_layer)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # v untouched
    assert not torch.equal(q, q_before)  # positions > 0 do turn the vectors


def test_rotary_at_position_zero_is_identity():
    rope = RotaryEmbedding(64, 32, max_position=8, base=10000.0, interleaved=True)
    q, k = randn(3, 2 * 64), randn(3, 64)
    q0, k0 = q.clone(), k.clone()
    rotary_embedding(torch.zeros(3, dtype=torch.int64), q, k, rope.cos_sin_cache, 64, True)
    close(q, q0)
    close(k, k0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("inter", [80, 1500])
def test_silu_and_mul_matches_reference(dtype, inter):
    x = randn(5, 2 * inter, dtype=dtype) * 4
    out = silu_and_mul(x)
    assert out.shape == (5, inter)
    close(out, reference.silu_and_mul(x))
    assert torch.equal(reference.silu_and_mul(x), SiluAndMul()(x))  # the CPU layer's path
