"""Every Triton kernel against its reference on CUDA, in bf16 and fp16, at awkward and real
(GLM-4-9B, Llama-3-8B, Qwen2.5-7B) sizes. Skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before importing the kernels: CPU runs use the interpreter
    pytest.skip("needs CUDA", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: these tests need compiled kernels",
                allow_module_level=True)  # fmt: skip
pytest.importorskip("triton")

from flatout.kernels import reference  # noqa: E402
from flatout.kernels.activation import silu_and_mul  # noqa: E402
from flatout.kernels.decode_attention import paged_decode_attention  # noqa: E402
from flatout.kernels.kv_cache import write_kv_cache  # noqa: E402
from flatout.kernels.norm import fused_add_rms_norm, rms_norm  # noqa: E402
from flatout.kernels.prefill_attention import paged_prefill_attention  # noqa: E402
from flatout.kernels.rotary import rotary_embedding  # noqa: E402
from flatout.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.kernels.paged_batch import make_paged_batch  # noqa: E402

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]
# (query heads, kv heads, head dim, block size)
ATTN_SHAPES = {
    "glm4-9b": (32, 2, 128, 16),
    "llama3-8b": (32, 8, 128, 32),
    "qwen2.5-7b": (28, 4, 128, 16),
    "awkward": (6, 2, 80, 8),
    "mha-d64": (8, 8, 64, 64),
}


def tol(dtype: torch.dtype) -> dict:
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)


def upcast(args):
    # fp8 caches stay fp8: the references dequantize them with their scales
    return [a.float() if torch.is_tensor(a) and a.is_floating_point() and a.element_size() > 1
            else a for a in args]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ATTN_SHAPES))
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_decode(dtype, name, num_splits):
    heads, kv_heads, head_dim, block_size = ATTN_SHAPES[name]
    lens = [0, 1, 511, 512, 2047, 33, 4000, 17]
    batch = make_paged_batch([(1 if n else 0, n) for n in lens], heads, kv_heads, head_dim,
                             block_size, dtype=dtype, device="cuda")  # fmt: skip
    q = torch.randn(len(lens), heads, head_dim, device="cuda").to(dtype)
    args = [q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale]
    out = paged_decode_attention(*args, num_splits=num_splits)
    ref = reference.paged_decode_attention(*upcast(args))
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ATTN_SHAPES))
def test_prefill(dtype, name):
    heads, kv_heads, head_dim, block_size = ATTN_SHAPES[name]
    chunks = [(512, 512), (1, 700), (37, 1037), (0, 0), (129, 300), (3, 3)]
    batch = make_paged_batch(chunks, heads, kv_heads, head_dim, block_size, dtype=dtype,
                             device="cuda", pad_tokens=5)  # fmt: skip
    args = [batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.scale, batch.meta.max_query_len]  # fmt: skip
    n = batch.num_real_tokens
    out = paged_prefill_attention(*args)[:n]
    ref = reference.paged_prefill_attention(*upcast(args))[:n]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


def test_decode_replays_in_a_cuda_graph():
    """Captured once, replayed with new lengths and tables written into the same tensors."""
    heads, kv_heads, head_dim, block_size = ATTN_SHAPES["glm4-9b"]
    first = make_paged_batch([(1, 40), (1, 1500), (0, 0)], heads, kv_heads, head_dim,
                             block_size, dtype=torch.bfloat16, device="cuda")  # fmt: skip
    q = torch.randn(3, heads, head_dim, device="cuda", dtype=torch.bfloat16)
    static = [q, first.k_cache, first.v_cache, first.block_tables, first.seq_lens, first.scale]
    out = paged_decode_attention(*static)  # warm up: compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention(*static)
    second = make_paged_batch([(1, 1000), (0, 0), (1, 3)], heads, kv_heads, head_dim, block_size,
                              dtype=torch.bfloat16, device="cuda", seed=1)
    first.k_cache[: second.k_cache.shape[0]].copy_(second.k_cache)
    first.v_cache[: second.v_cache.shape[0]].copy_(second.v_cache)
    first.block_tables.zero_()
    first.block_tables[:, : second.block_tables.shape[1]].copy_(second.block_tables)
    first.seq_lens.copy_(second.seq_lens)
    q.copy_(torch.randn_like(q))
    graph.replay()
    ref = reference.paged_decode_attention(*upcast(static))
    torch.testing.assert_close(out.float(), ref, **tol(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_cache(dtype):
    batch = make_paged_batch([(300, 300), (1, 77), (0, 0), (13, 500)], 32, 2, 128, 16,
                             dtype=dtype, device="cuda", pad_tokens=7)  # fmt: skip
    t = batch.slot_mapping.shape[0]
    qkv = torch.randn(t, 36 * 128, device="cuda").to(dtype)  # GLM-4-9B: 32 q + 2 k + 2 v heads
    k, v = qkv[:, 4096:4352].view(t, 2, 128), qkv[:, 4352:].view(t, 2, 128)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping)
    reference.write_kv_cache(k, v, batch.k_cache, batch.v_cache, batch.slot_mapping)
    assert torch.equal(k_cache, batch.k_cache) and torch.equal(v_cache, batch.v_cache)


# -- --kv-cache-dtype fp8: float8_e4m3fn caches with per-tensor scales -------------------------
FP8 = torch.float8_e4m3fn


def fp8_scales():
    return (torch.tensor(0.05, device="cuda"), torch.tensor(0.02, device="cuda"))


def to_fp8(batch, k_scale, v_scale):
    batch.k_cache = reference.quantize_kv(batch.k_cache, k_scale)
    batch.v_cache = reference.quantize_kv(batch.v_cache, v_scale)
    return batch


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_fp8_kv_cache_is_bit_exact(dtype):
    """The GPU rounds to nearest even and saturates, exactly as torch's conversion does."""
    batch = make_paged_batch([(300, 300), (1, 77), (0, 0), (13, 500)], 32, 2, 128, 16,
                             dtype=dtype, device="cuda", pad_tokens=7)  # fmt: skip
    to_fp8(batch, None, None)
    t = batch.slot_mapping.shape[0]
    qkv = (torch.randn(t, 36 * 128, device="cuda") * 30).to(dtype)
    qkv[0, 4096] = 1e4  # beyond 448 * scale: saturates
    k, v = qkv[:, 4096:4352].view(t, 2, 128), qkv[:, 4352:].view(t, 2, 128)
    ks, vs = fp8_scales()
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_cache(k, v, k_cache, v_cache, batch.slot_mapping, ks, vs)
    reference.write_kv_cache(k, v, batch.k_cache, batch.v_cache, batch.slot_mapping, ks, vs)
    assert torch.equal(k_cache.view(torch.uint8), batch.k_cache.view(torch.uint8))
    assert torch.equal(v_cache.view(torch.uint8), batch.v_cache.view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["glm4-9b", "awkward", "mha-d64"])
@pytest.mark.parametrize("num_splits", [None, 1, 7])
def test_fp8_decode(dtype, name, num_splits):
    heads, kv_heads, head_dim, block_size = ATTN_SHAPES[name]
    lens = [0, 1, 511, 512, 2047, 33, 4000, 17]
    batch = make_paged_batch([(1 if n else 0, n) for n in lens], heads, kv_heads, head_dim,
                             block_size, device="cuda")  # fmt: skip
    ks, vs = fp8_scales()
    to_fp8(batch, ks, vs)
    q = torch.randn(len(lens), heads, head_dim, device="cuda").to(dtype)
    args = [q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens, batch.scale]
    out = paged_decode_attention(*args, ks, vs, num_splits=num_splits)
    ref = reference.paged_decode_attention(*upcast(args), ks, vs)
    assert torch.isfinite(out).all() and (out[0] == 0).all()
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["glm4-9b", "awkward"])
def test_fp8_prefill(dtype, name):
    heads, kv_heads, head_dim, block_size = ATTN_SHAPES[name]
    chunks = [(512, 512), (1, 700), (37, 1037), (0, 0), (129, 300), (3, 3)]
    batch = make_paged_batch(chunks, heads, kv_heads, head_dim, block_size, device="cuda",
                             pad_tokens=5)  # fmt: skip
    ks, vs = fp8_scales()
    to_fp8(batch, ks, vs)
    q = batch.q.to(dtype)
    args = [q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.scale, batch.meta.max_query_len]  # fmt: skip
    n = batch.num_real_tokens
    out = paged_prefill_attention(*args, ks, vs)[:n]
    ref = reference.paged_prefill_attention(*upcast(args), ks, vs)[:n]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [4096, 3584, 80])
def test_rms_norms(dtype, hidden):
    x = torch.randn(37, hidden, device="cuda").to(dtype) * 4
    residual = torch.randn_like(x)
    w = (torch.randn(hidden, device="cuda") * 0.1 + 1).to(dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), reference.rms_norm(x, w, 1e-5), **tol(dtype))
    normed, summed = fused_add_rms_norm(x, residual, w, 1e-5)
    normed_ref, summed_ref = reference.fused_add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(summed, summed_ref)
    torch.testing.assert_close(normed, normed_ref, **tol(dtype))


# (heads, kv heads, head dim, rotary dim, interleaved)
ROTARY = {"glm4-9b": (32, 2, 128, 64, True), "llama3-8b": (32, 8, 128, 128, False),
          "qwen2.5-7b": (28, 4, 128, 128, False), "awkward": (6, 2, 80, 40, False)}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(ROTARY))
def test_rotary(dtype, name):
    heads, kv_heads, head_dim, rotary_dim, interleaved = ROTARY[name]
    rope = RotaryEmbedding(head_dim, rotary_dim, 8192, 10000.0, interleaved).cuda()
    t = 301
    positions = torch.randint(0, 8192, (t,), device="cuda")
    qkv = torch.randn(t, (heads + 2 * kv_heads) * head_dim, device="cuda").to(dtype)
    qkv_ref = qkv.clone()
    q_end, k_end = heads * head_dim, (heads + kv_heads) * head_dim
    rotary_embedding(positions, qkv[:, :q_end], qkv[:, q_end:k_end], rope.cos_sin_cache,
                     head_dim, interleaved)  # fmt: skip
    reference.rotary_embedding(positions, qkv_ref[:, :q_end], qkv_ref[:, q_end:k_end],
                         rope.cos_sin_cache, head_dim, interleaved)  # fmt: skip
    torch.testing.assert_close(qkv, qkv_ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [13696, 14336, 1000])
def test_silu_and_mul(dtype, inter):
    x = torch.randn(37, 2 * inter, device="cuda").to(dtype) * 4
    torch.testing.assert_close(silu_and_mul(x), reference.silu_and_mul(x), **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 8, 16])
@pytest.mark.parametrize(
    "n,k,bias",
    [(4608, 4096, True), (4096, 13696, False), (27392, 4096, False), (1000, 333, True)],
)
def test_gemv(dtype: torch.dtype, rows: int, n: int, k: int, bias: bool) -> None:
    from flatout.kernels.gemv import gemv

    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * 0.02
    b = torch.randn(n, device="cuda", dtype=dtype) if bias else None
    expected = reference.linear(x.float(), w.float(), None if b is None else b.float())
    torch.testing.assert_close(gemv(x, w, b).float(), expected, **tol(dtype))


@pytest.mark.parametrize("rows", [1, 7, 32, 64])
@pytest.mark.parametrize("n,k,bias", [(4608, 4096, True), (4096, 13696, False), (1000, 333, True)])
def test_int8_gemv(rows: int, n: int, k: int, bias: bool) -> None:
    from flatout.kernels.gemv import linear_w8a16

    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    q, scale = reference.quantize_int8(torch.randn(n, k, device="cuda") * 0.02)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    expected = reference.linear_w8a16(x.float(), q, scale, None if b is None else b.float())
    torch.testing.assert_close(linear_w8a16(x, q, scale, b).float(), expected, **tol(x.dtype))


def _top_p_bounds(logits: torch.Tensor, args: tuple, delta: float = 1e-4):
    """([B, V], [B, V]) bool: the float64 kept sets at top_p - delta and top_p + delta. An fp32
    path sums the masses in its own order, so it may keep any set between the two (kept sets
    grow with top_p), and no other."""
    top_k, top_p, max_k, every = args
    x = logits.double()
    live = top_p < 1.0  # rows at 1 keep everything
    lo = torch.where(live, top_p - delta, top_p).clamp(min=1e-30)
    hi = torch.where(live, top_p + delta, top_p).clamp(max=1.0)
    return (torch.isfinite(reference.top_k_top_p(x.clone(), top_k, lo, max_k, every)),
            torch.isfinite(reference.top_k_top_p(x.clone(), top_k, hi, max_k, every)))


# rows x vocabulary: one row over the whole GPU (chunked, a launch per pass), a few rows, more
# rows than two per SM (one program per row, one launch), an awkward vocabulary
@pytest.mark.parametrize("B,V", [(1, 151552), (7, 50257), (300, 151552), (33, 1000)])
@pytest.mark.parametrize("bf16_logits", [False, True])  # bf16 logits upcast: many ties
@pytest.mark.parametrize("k", [None, 50, 3000, "half"])  # none, candidates, large k, mixed rows
def test_top_k_top_p_matches_reference(B, V, bf16_logits, k):
    from flatout.kernels.top_k_top_p import top_k_top_p

    g = torch.Generator("cuda").manual_seed(B + V)
    logits = torch.randn(B, V, device="cuda", generator=g) * torch.linspace(0.5, 6, B,
                                                                            device="cuda")[:, None]
    if bf16_logits:
        logits = logits.bfloat16().float()
    logits[torch.rand(B, V, device="cuda", generator=g) < 0.2] = float("-inf")  # bias / grammar
    top_p = torch.rand(B, device="cuda", generator=g) * 0.99 + 0.005
    if B > 2:
        logits[1, 1:] = float("-inf")  # one token left
        top_p[2] = 1.0  # a row without top-p
    top_k = None
    max_k, every = 0, False
    if k is not None:
        kk = 50 if k == "half" else min(int(k), V - 1)
        ks = torch.full((B,), kk, device="cuda")
        if k == "half":
            ks[1::2] = V
        top_k, max_k, every = ks, kk, bool((ks < V).all())
    args = (top_k, top_p, max_k, every)
    lo, hi = _top_p_bounds(logits, args)
    for out in (top_k_top_p(logits.clone(), *args), reference.top_k_top_p(logits.clone(), *args)):
        keep = torch.isfinite(out)
        assert torch.equal(out, torch.where(keep, logits, float("-inf")))
        assert not (lo & ~keep).any() and not (keep & ~hi).any()
    assert (lo != hi).sum() < B * V // 100  # the bounds are tight


def test_sampler_with_the_kernel_draws_what_the_reference_draws():
    import dataclasses

    from flatout.kernels.ops import REFERENCE_OPS
    from flatout.layers.sampler import Sampler, SamplingBatch, SamplingRow
    from flatout.sampling_params import SamplingParams

    dev = torch.device("cuda")
    V = 151552
    logits = torch.randn(6, V, device=dev, generator=torch.Generator(dev).manual_seed(3)) * 3
    logits[2, ::3] = float("-inf")  # a grammar's mask
    params = [
        SamplingParams(temperature=0.8, top_p=0.9, seed=1),
        SamplingParams(temperature=1.2, top_k=50, top_p=0.8, seed=2),
        SamplingParams(temperature=1.0, top_p=0.5, seed=3),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=1.5, top_p=0.95, min_p=0.02, seed=5),
        SamplingParams(temperature=0.9, top_k=2000, seed=6),
    ]
    kernel = Sampler(dev)
    kernel.warm_up(dev)
    with_sort = Sampler(dev)
    with_sort.ops = dataclasses.replace(kernel.ops, top_k_top_p=REFERENCE_OPS.top_k_top_p)

    def draws(sampler: Sampler) -> list[list[int]]:
        gens = [torch.Generator(dev).manual_seed(p.seed or 0) for p in params]
        out = []
        for _ in range(4):
            rows = [SamplingRow(p, [], [], generator=g) for p, g in zip(params, gens, strict=True)]
            batch = SamplingBatch.build(rows, V, dev)
            out.append(sampler(logits.clone(), batch).token_ids.tolist())
        return out

    assert draws(kernel) == draws(with_sort)
