"""Paged attention and KV-cache kernels against their references, under the Triton interpreter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flatout.kernels import reference
from flatout.kernels.decode_attention import decode_num_splits, paged_decode_attention
from flatout.kernels.kv_cache import write_kv_cache
from flatout.kernels.prefill_attention import paged_prefill_attention
from flatout.layers import attention
from tests.kernels.paged_batch import make_paged_batch

CPU = torch.device("cpu")
# (query heads, kv heads, head dim, block size): GQA ratio 3 with head dim 80, ratio 16, plain MHA
SHAPES = [(6, 2, 80, 8), (16, 1, 64, 16), (2, 2, 32, 32)]
# context lengths of a decode batch: padding row (0), one token, mid-block, whole blocks, and
# long enough for several 64-token tiles per split
DECODE_LENS = [1, 0, 37, 32, 200]


def _tol(bf16_storage: bool) -> dict:
    # the interpreter truncates (instead of rounding) when it stores bf16: allow one ulp
    return dict(atol=2e-2, rtol=2e-2) if bf16_storage else dict(atol=1e-5, rtol=1e-5)


def _decode_batch(lens, shape, dtype=torch.float32, seed=0):
    num_heads, num_kv_heads, head_dim, block_size = shape
    batch = make_paged_batch(
        [(1 if n else 0, n) for n in lens], num_heads, num_kv_heads, head_dim, block_size,
        dtype=dtype, bf16_values=True, seed=seed,
    )  # fmt: skip
    q = torch.randn(len(lens), num_heads, head_dim, generator=torch.Generator().manual_seed(seed))
    return batch, q.bfloat16().to(dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_splits", [1, 3, 8, None])
def test_decode_matches_references(shape, num_splits):
    batch, q = _decode_batch(DECODE_LENS, shape)
    args = (q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    out = paged_decode_attention(*args, num_splits=num_splits)
    ref = reference.paged_decode_attention(*args)
    torch.testing.assert_close(out, ref, **_tol(False))
    assert not out.isnan().any()
    assert (out[1] == 0).all(), "padding row (seq_len 0) must come out as zeros"
    real = [i for i, n in enumerate(DECODE_LENS) if n]
    as_prefill = reference.paged_prefill_attention(
        q[real], batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
        batch.block_tables, batch.scale, 1,
    )  # fmt: skip
    torch.testing.assert_close(ref[real], as_prefill, atol=1e-5, rtol=1e-5)


def test_decode_bf16_storage_and_strided_q_into_given_out():
    shape = (6, 2, 80, 8)
    batch, q = _decode_batch(DECODE_LENS, shape, dtype=torch.bfloat16, seed=1)
    qkv = torch.cat([q, torch.randn_like(q)], dim=1)  # q as a strided view of a wider tensor
    q_view = qkv[:, : shape[0]]
    out = torch.full_like(q, float("nan"))
    args = (batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale)
    result = paged_decode_attention(q_view, *args, out=out, num_splits=2)
    assert result is out
    ref = reference.paged_decode_attention(
        q.float(), batch.k_cache.float(), batch.v_cache.float(), *args[2:]
    )
    torch.testing.assert_close(out.float(), ref, **_tol(True))


def test_decode_equals_prefill_with_chunks_of_one():
    batch, q = _decode_batch([5, 64, 9], (6, 2, 80, 8))
    decode = paged_decode_attention(
        q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale,
        num_splits=2,
    )  # fmt: skip
    prefill = paged_prefill_attention(
        q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
        batch.block_tables, batch.scale, max_query_len=1,
    )  # fmt: skip
    torch.testing.assert_close(decode, prefill, atol=1e-5, rtol=1e-5)


def test_decode_num_splits_depends_only_on_static_shapes():
    # the interpreter counts 8 SMs, so the target is 4 x 8 = 32 (batch x kv head x split) programs
    assert decode_num_splits(1, 2, 512, 16, CPU) == 16  # 2 programs x 16 splits
    assert decode_num_splits(1, 2, 4, 16, CPU) == 1  # a 64-token table leaves nothing to split
    assert decode_num_splits(1, 2, 16, 16, CPU) == 4  # 256 tokens: one 64-token tile per split
    assert decode_num_splits(2, 1, 1000, 16, CPU) == 16
    assert decode_num_splits(3, 1, 1000, 16, CPU) == 8  # 32 // 3 rounded down to a power of two
    assert decode_num_splits(8, 2, 4096, 16, CPU) == 2
    assert decode_num_splits(16, 2, 4096, 16, CPU) == 1  # the batch alone gives 32 programs
    assert decode_num_splits(64, 2, 4096, 16, CPU) == 1


# (new tokens, context after the step): prefix hits, a whole prompt, a decode row, an empty row,
# odd chunks ending mid-block, a one-token prompt
PREFILL_CHUNKS = [(5, 37), (0, 0), (1, 20), (33, 33), (17, 50), (1, 1)]


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_matches_references(shape, dtype):
    num_heads, num_kv_heads, head_dim, block_size = shape
    batch = make_paged_batch(
        PREFILL_CHUNKS, num_heads, num_kv_heads, head_dim, block_size,
        dtype=dtype, bf16_values=True, pad_tokens=3,
    )  # fmt: skip
    args = (batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.scale, batch.meta.max_query_len)  # fmt: skip
    n = batch.num_real_tokens
    out = paged_prefill_attention(*args)[:n]
    assert not out.float().isnan().any()
    upcast = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    ref = reference.paged_prefill_attention(*upcast)[:n]
    torch.testing.assert_close(out.float(), ref, **_tol(dtype == torch.bfloat16))
    if dtype == torch.float32:  # the CPU layer runs the reference, K/V write included
        layer = attention.Attention(num_heads, num_kv_heads, head_dim, batch.scale)
        layer.k_cache, layer.v_cache = batch.k_cache.clone(), batch.v_cache.clone()
        slots = batch.slot_mapping[:n]
        k = batch.k_cache.flatten(0, 1)[slots].flatten(1)  # the K/V already in the cache
        v = batch.v_cache.flatten(0, 1)[slots].flatten(1)
        with attention.forward_context(dataclasses.replace(batch.meta, slot_mapping=slots)):
            got = layer(batch.q[:n].flatten(1), k, v)
        torch.testing.assert_close(ref, got.view(ref.shape), atol=1e-5, rtol=1e-5)


def test_prefill_with_more_query_tiles_than_one_chunk_needs():
    # max_query_len larger than any chunk: the extra tiles must exit without writing
    batch = make_paged_batch([(3, 10), (2, 2)], 4, 2, 32, 8)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.scale)  # fmt: skip
    torch.testing.assert_close(
        paged_prefill_attention(*args, 200), reference.paged_prefill_attention(*args, 3)
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_cache_matches_reference(dtype):
    num_kv_heads, head_dim, block_size = 3, 80, 8
    batch = make_paged_batch(
        [(5, 37), (0, 0), (1, 20), (9, 9)], 6, num_kv_heads, head_dim, block_size,
        dtype=dtype, pad_tokens=2,
    )  # fmt: skip
    t = batch.slot_mapping.shape[0]
    qkv = torch.randn(t, (2 + 2 * num_kv_heads) * head_dim).to(dtype)  # k, v: strided views
    k = qkv[:, 2 * head_dim : (2 + num_kv_heads) * head_dim].view(t, num_kv_heads, head_dim)
    v = qkv[:, (2 + num_kv_heads) * head_dim :].view(t, num_kv_heads, head_dim)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
    k_ref, v_ref = batch.k_cache.clone(), batch.v_cache.clone()
    reference.write_kv_cache(k, v, k_ref, v_ref, batch.slot_mapping)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    assert not torch.equal(k_cache, batch.k_cache)  # something was written
    # padding tokens (slot -1) wrote nothing: only the real tokens' slots changed
    changed = (k_cache != batch.k_cache).flatten(2).any(-1).flatten()
    assert set(changed.nonzero().flatten().tolist()) <= set(batch.slot_mapping.tolist())
