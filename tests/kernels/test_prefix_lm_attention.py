"""The prefix-bidirectional mask (ChatGLM-6B v1's prompt) in the paged prefill kernel, against
its reference and against a dense mask written out here, under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from flatout.kernels import reference
from flatout.kernels.prefill_attention import paged_prefill_attention
from tests.kernels.paged_batch import make_paged_batch

# (new tokens, context after the step) with each sequence's bidirectional prefix: a whole
# prompt, a chunk after a cached prefix that covers the rest of the context, a prefix longer
# than one 64-key tile past the chunk's causal reach, a decode row, an empty row, a causal row
CHUNKS = [(33, 33), (9, 40), (70, 75), (1, 20), (0, 0), (17, 50)]
PREFIXES = [32, 36, 74, 19, 0, 0]


def _dense(q, k, v, scale, prefix_len):  # one sequence, the mask written out in full
    n, s = q.shape[0], k.shape[0]
    q_pos = torch.arange(s - n, s)[:, None]
    k_pos = torch.arange(s)[None, :]
    allowed = (k_pos <= q_pos) | (k_pos < prefix_len)
    scores = torch.einsum("nhd,shd->hns", q.float(), k.float()) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hns,shd->nhd", scores.softmax(-1), v.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_mask_kernel_matches_reference(dtype):
    heads, kv_heads, head_dim, block_size = 4, 2, 32, 8
    batch = make_paged_batch(CHUNKS, heads, kv_heads, head_dim, block_size, dtype=dtype,
                             bf16_values=True, pad_tokens=2)
    prefix = torch.tensor(PREFIXES, dtype=torch.int32)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.scale, batch.meta.max_query_len)  # fmt: skip
    n = batch.num_real_tokens
    out = paged_prefill_attention(*args, prefix_lens=prefix)[:n]
    upcast = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    ref = reference.paged_prefill_attention(*upcast, prefix_lens=prefix)[:n]
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.float(), ref, **tol)
    causal = reference.paged_prefill_attention(*upcast)[:n]
    # the prefix changes the rows that see past their own position, and only those
    starts = batch.meta.query_start_loc_cpu
    for i, ((new, ctx), p) in enumerate(zip(CHUNKS, PREFIXES, strict=True)):
        rows = slice(starts[i], starts[i + 1])
        first = ctx - new
        k = reference._context(batch.k_cache.float(), batch.block_tables[i], ctx)
        v = reference._context(batch.v_cache.float(), batch.block_tables[i], ctx)
        if new:
            dense = _dense(batch.q[rows].float(), k.repeat_interleave(2, 1),
                           v.repeat_interleave(2, 1), batch.scale, p)
            torch.testing.assert_close(ref[rows], dense, atol=1e-5, rtol=1e-5)
        sees_ahead = max(0, min(new, p - 1 - first))  # queries before the prefix's last token
        if sees_ahead:
            assert not torch.allclose(ref[rows][:sees_ahead], causal[rows][:sees_ahead])
        torch.testing.assert_close(ref[rows][sees_ahead:], causal[rows][sees_ahead:])


def test_zero_prefix_is_causal():
    batch = make_paged_batch([(12, 30), (5, 5)], 2, 2, 16, 4)
    args = (batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.scale, batch.meta.max_query_len)  # fmt: skip
    zeros = torch.zeros(2, dtype=torch.int32)
    torch.testing.assert_close(paged_prefill_attention(*args, prefix_lens=zeros),
                               paged_prefill_attention(*args), atol=0, rtol=0)
