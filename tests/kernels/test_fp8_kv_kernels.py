"""fp8 (float8_e4m3fn) KV cache: the write kernel and both attention kernels against their
references under the Triton interpreter, and the references against attention over the
dequantized cache."""

from __future__ import annotations

import pytest
import torch

from flatout.kernels import reference
from flatout.kernels.decode_attention import paged_decode_attention
from flatout.kernels.kv_cache import write_kv_cache
from flatout.kernels.prefill_attention import paged_prefill_attention
from tests.kernels.paged_batch import make_paged_batch

FP8 = torch.float8_e4m3fn
SHAPES = [(6, 2, 80, 8), (16, 1, 64, 16)]  # (query heads, kv heads, head dim, block size)
DECODE_LENS = [1, 0, 37, 32, 200]
PREFILL_CHUNKS = [(5, 37), (0, 0), (1, 20), (33, 33), (17, 50), (1, 1)]


def _scales(k: float, v: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(k), torch.tensor(v)


def _to_fp8(batch, k_scale, v_scale):
    """The batch's random caches quantized as the write kernel stores them."""
    batch.k_cache = reference.quantize_kv(batch.k_cache, k_scale)
    batch.v_cache = reference.quantize_kv(batch.v_cache, v_scale)
    return batch


def _only_interpreter_rounding_differs(x: torch.Tensor, got: torch.Tensor,
                                       want: torch.Tensor) -> int:
    """Where the kernel's fp8 `got` differs from the reference's `want` (torch, round to nearest
    even, as the GPU converts), the difference must be one of the interpreter's two known fp8
    rounding defects: a tie rounded away from zero instead of to even, or a round-up into the
    next power of two that loses its carry (1.95 -> 1.0 instead of 2.0). Returns how many."""
    differ = got.view(torch.uint8) != want.view(torch.uint8)
    xf, g, w = x.float()[differ], got.float()[differ], want.float()[differ]
    tie = (xf - g).abs() == (xf - w).abs()
    lost_carry = (g * 2 == w) & (torch.frexp(w).mantissa.abs() == 0.5)  # w a power of two
    assert bool((tie | lost_carry).all()), (xf[~(tie | lost_carry)], g, w)
    return int(differ.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_fp8_kv_cache_matches_reference(dtype):
    num_kv_heads, head_dim, block_size = 3, 80, 8
    batch = make_paged_batch(
        [(5, 37), (0, 0), (1, 20), (9, 9)], 6, num_kv_heads, head_dim, block_size,
        dtype=dtype, pad_tokens=2,
    )  # fmt: skip
    _to_fp8(batch, None, None)
    t = batch.slot_mapping.shape[0]
    gen = torch.Generator().manual_seed(3)
    qkv = (torch.randn(t, (2 + 2 * num_kv_heads) * head_dim, generator=gen) * 100).to(dtype)
    qkv[0, 2 * head_dim] = 1e6  # saturates at 448 (e4m3fn has no infinity)
    k = qkv[:, 2 * head_dim : (2 + num_kv_heads) * head_dim].view(t, num_kv_heads, head_dim)
    v = qkv[:, (2 + num_kv_heads) * head_dim :].view(t, num_kv_heads, head_dim)
    k_scale, v_scale = _scales(0.37, 1.9)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping, k_scale, v_scale)
    k_ref, v_ref = batch.k_cache.clone(), batch.v_cache.clone()
    reference.write_kv_cache(k, v, k_ref, v_ref, batch.slot_mapping, k_scale, v_scale)
    assert k_cache.dtype == FP8 and k_ref.dtype == FP8
    slots = batch.slot_mapping[batch.slot_mapping >= 0]
    for new, cache, ref, scale in ((k, k_cache, k_ref, k_scale), (v, v_cache, v_ref, v_scale)):
        x = (new[batch.slot_mapping >= 0].float() / scale).clamp(-448, 448)
        got, want = cache.flatten(0, 1)[slots], ref.flatten(0, 1)[slots]
        assert _only_interpreter_rounding_differs(x, got, want) < 0.03 * want.numel()
        # the rest of the cache is untouched
        rest = torch.ones(cache.shape[0] * cache.shape[1], dtype=torch.bool)
        rest[slots] = False
        assert torch.equal(cache.flatten(0, 1)[rest].view(torch.uint8),
                           ref.flatten(0, 1)[rest].view(torch.uint8))
    assert float(k_ref.flatten(0, 1)[slots[0], 0, 0].float()) == 448.0
    # what is stored is x / scale to fp8 precision (3 mantissa bits: relative error <= 1/16)
    stored = reference.dequantize_kv(k_ref.flatten(0, 1)[slots], k_scale)
    want = k[batch.slot_mapping >= 0].float().clamp(-448 * 0.37, 448 * 0.37)
    torch.testing.assert_close(stored, want, rtol=1 / 16, atol=2**-9 * 0.37)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_fp8_decode_matches_reference(shape, num_splits):
    num_heads, num_kv_heads, head_dim, block_size = shape
    batch = make_paged_batch(
        [(1 if n else 0, n) for n in DECODE_LENS], num_heads, num_kv_heads, head_dim,
        block_size, seed=1,
    )  # fmt: skip
    k_scale, v_scale = _scales(0.05, 0.02)
    dense_k, dense_v = batch.k_cache, batch.v_cache
    _to_fp8(batch, k_scale, v_scale)
    q = torch.randn(len(DECODE_LENS), num_heads, head_dim,
                    generator=torch.Generator().manual_seed(2))  # fmt: skip
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    out = paged_decode_attention(*args, k_scale, v_scale, num_splits=num_splits)
    ref = reference.paged_decode_attention(*args, k_scale, v_scale)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert (out[1] == 0).all(), "padding row (seq_len 0) must come out as zeros"
    # the reference is attention over the dequantized cache: scaled fp8 values, not raw bytes
    dequant = (batch.k_cache.float() * k_scale, batch.v_cache.float() * v_scale)
    over_dequant = reference.paged_decode_attention(q, *dequant, *args[3:])
    torch.testing.assert_close(ref, over_dequant, atol=1e-6, rtol=1e-6)
    # and near attention over the unquantized cache (fp8 keeps ~2 significant digits)
    exact = reference.paged_decode_attention(q, dense_k, dense_v, *args[3:])
    err = (ref - exact).abs().max() / exact.abs().max()
    assert err < 0.05, err
    unscaled = reference.paged_decode_attention(*args)  # ignoring the scales is wrong
    assert not torch.allclose(unscaled, ref, atol=1e-2)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_fp8_prefill_matches_reference(model_dtype):
    num_heads, num_kv_heads, head_dim, block_size = SHAPES[0]
    batch = make_paged_batch(
        PREFILL_CHUNKS, num_heads, num_kv_heads, head_dim, block_size,
        bf16_values=True, pad_tokens=3, seed=4,
    )  # fmt: skip
    k_scale, v_scale = _scales(0.1, 0.03)
    _to_fp8(batch, k_scale, v_scale)
    q = batch.q.to(model_dtype)
    args = (batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.scale, batch.meta.max_query_len)  # fmt: skip
    n = batch.num_real_tokens
    out = paged_prefill_attention(q, *args, k_scale, v_scale)[:n]
    assert out.dtype == model_dtype
    ref = reference.paged_prefill_attention(q.float(), *args, k_scale, v_scale)[:n]
    tol = dict(atol=1e-5, rtol=1e-5) if model_dtype == torch.float32 else dict(atol=2e-2,
                                                                                 rtol=2e-2)
    torch.testing.assert_close(out.float(), ref, **tol)
    # decodes in the batch (chunks of one) agree with the decode kernel over the same cache
    dec_rows = [i for i, (new, _) in enumerate(PREFILL_CHUNKS) if new == 1]
    starts = batch.meta.query_start_loc_cpu
    q_dec = q[[starts[i] for i in dec_rows]]
    decode = paged_decode_attention(
        q_dec, batch.k_cache, batch.v_cache, batch.block_tables[dec_rows],
        batch.seq_lens[dec_rows], batch.scale, k_scale, v_scale,
    )  # fmt: skip
    torch.testing.assert_close(decode.float(), out[[starts[i] for i in dec_rows]].float(), **tol)
