"""Weight quantization (--quantization int8 | fp8): the formats, their loading and sharding in
the parallel linears and the LM head, and the accuracy of quantized tiny models against their
full-precision selves."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flatout import LLM, SamplingParams, distributed
from flatout.config import EngineArgs
from flatout.kernels import reference
from flatout.layers.embedding import ParallelLMHead
from flatout.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from flatout.layers.quantization import check_device
from flatout.models.registry import load_model, resolve_model_config
from tests.helpers.logits import flatout_logits, random_prompts
from tests.helpers.tiny_checkpoints import ARCHITECTURES, make_tiny_checkpoint

CPU = torch.device("cpu")


# -- formats and their reference ops ---------------------------------------------------------
def test_int8_and_fp8_round_trip_per_channel() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=g) * torch.logspace(-3, 1, 32)[:, None]
    w[5] = 0.0
    q, s = reference.quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (32,) and s[5] == 1.0 and not q[5].any()
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()  # half a step
    assert (q.abs().amax(dim=1)[s != 1.0] == 127).all()  # each row uses the whole range
    f, fs = reference.quantize_fp8(w)
    assert f.dtype == torch.float8_e4m3fn and fs[5] == 1.0
    deq = f.float() * fs[:, None]
    # e4m3 keeps 3 mantissa bits: within 2^-4 relative, except near-zero subnormals
    big = w.abs() > fs[:, None] * 2**-6
    assert ((deq - w).abs()[big] <= w.abs()[big] * 2**-4 + 1e-9).all()
    assert (f.float().abs().amax(dim=1)[fs != 1.0] == reference.FP8_MAX).all()


def test_quantized_reference_ops_are_dequantize_then_matmul() -> None:
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(5, 64, generator=g), torch.randn(24, 64, generator=g), torch.randn(24)
    q, s = reference.quantize_int8(w)
    want = x @ (q.float() * s[:, None]).T + b
    torch.testing.assert_close(reference.linear_w8a16(x, q, s, b), want, rtol=1e-5, atol=1e-5)
    f, fs = reference.quantize_fp8(w)
    xq, xs = reference.quantize_fp8_per_token(x)
    assert xq.dtype == torch.float8_e4m3fn and xs.shape == (5, 1)
    want = (xq.float() * xs) @ (f.float() * fs[:, None]).T + b
    got = reference.linear_w8a8_fp8(x, f, fs, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # W8A8 error vs the exact product: a few % (both operands rounded to 3 mantissa bits)
    rel = ((got - (x @ w.T + b)).norm() / (x @ w.T + b).norm()).item()
    assert 0.005 < rel < 0.05


# -- layers: loading, sharding -----------------------------------------------------------------
@pytest.fixture
def tp_rank() -> Iterator[object]:
    """Build layers as rank r of a TP group of 2 (no process group needed to load weights)."""

    def set_rank(rank: int, size: int = 2) -> None:
        distributed.init_tensor_parallel(rank, size)

    yield set_rank
    distributed.init_tensor_parallel(0, 1)


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_fused_and_row_parallel_shards_hold_the_unsplit_quantization(tp_rank, method) -> None:
    """TP = 2: each rank's quantized rows and scales are its slice of the TP = 1 layer's, and a
    row-parallel layer's scales (over the whole row) are the same on both ranks."""
    g = torch.Generator().manual_seed(2)
    hidden, heads, kv_heads, hd, inter = 32, 4, 2, 8, 24
    q_w, k_w, v_w = (torch.randn(n * hd, hidden, generator=g) for n in (heads, kv_heads, kv_heads))
    gate_up = torch.randn(2 * inter, hidden, generator=g)
    down = torch.randn(hidden, inter, generator=g)

    def build(rank: int, size: int) -> tuple:
        tp_rank(rank, size)
        qkv = QKVParallelLinear(hidden, hd, heads, kv_heads, bias=False, quantization=method)
        for sid, w in zip("qkv", (q_w, k_w, v_w), strict=True):
            qkv.weight_loader(qkv.weight, w, sid)
        mlp = MergedColumnParallelLinear(hidden, [inter, inter], quantization=method)
        mlp.weight_loader(mlp.weight, gate_up)  # fused: split into gate | up, then sharded
        row = RowParallelLinear(inter, hidden, quantization=method)
        row.weight_loader(row.weight, down)
        return qkv, mlp, row

    one = build(0, 1)
    ranks = [build(r, 2) for r in range(2)]
    fmt = torch.int8 if method == "int8" else torch.float8_e4m3fn
    for layer in one:
        assert layer.weight.dtype == fmt and layer.weight_scale.dtype == torch.float32

    def rows_of(t: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        return torch.cat([p.chunk(2)[rank] for p in t.split(sizes)])

    qkv_sizes, mlp_sizes = [heads * hd, kv_heads * hd, kv_heads * hd], [inter, inter]
    for r, (qkv, mlp, row) in enumerate(ranks):
        for got, full, sizes in ((qkv, one[0], qkv_sizes), (mlp, one[1], mlp_sizes)):
            assert torch.equal(got.weight.view(torch.uint8),
                               rows_of(full.weight.view(torch.uint8), sizes, r))
            assert torch.equal(got.weight_scale, rows_of(full.weight_scale, sizes, r))
        assert torch.equal(row.weight.view(torch.uint8),
                           one[2].weight.view(torch.uint8).chunk(2, dim=1)[r])
        assert torch.equal(row.weight_scale, one[2].weight_scale)  # replicated, full-row
    # the two ranks' partial sums add up to the one-rank output (int8: exactly; fp8 quantizes
    # each rank's half of the activations with its own scale)
    tp_rank(0, 1)
    x = torch.randn(3, inter, generator=g)
    full_out = one[2](x)
    partials = [rk[2].matmul(xs, None) for rk, xs in zip(ranks, x.chunk(2, dim=1), strict=True)]
    err = ((partials[0] + partials[1] - full_out).norm() / full_out.norm()).item()
    assert err < (1e-6 if method == "int8" else 0.05)


def test_lm_head_quantized_over_vocab_shards_with_padding(tp_rank) -> None:
    g = torch.Generator().manual_seed(3)
    table = torch.randn(11, 16, generator=g)  # 11 rows: rank 1 holds 5 real + 1 padding row
    tp_rank(1, 2)
    head = ParallelLMHead(11, 16, quantization="int8")
    head.weight_loader(head.weight, table)
    q, s = reference.quantize_int8(table[6:])
    assert torch.equal(head.weight[:5], q) and torch.equal(head.weight_scale[:5], s)
    assert not head.weight[5].any() and head.weight_scale[5] == 1.0
    with pytest.raises(ValueError, match=r"expected \(11, 16\)"):
        head.weight_loader(head.weight, table[:10])


# -- models: accuracy, dummy weights, bad input ---------------------------------------------------
# Teacher-forced over 38 positions of 4 prompts (fp32 CPU, tiny random checkpoints), measured:
# int8: logits' relative error 0.010-0.013, top-1 agreement 0.974-1.0 (0.947-1.0 with the LM
# head quantized, error 0.012-0.014); fp8 (W8A8, activations quantized too): error 0.059-0.074,
# top-1 0.842-0.974. The bounds sit just outside the worst architecture.
BOUNDS = {  # (method, quantize_lm_head) -> (max relative error, min top-1 agreement)
    ("int8", False): (0.014, 0.97),
    ("int8", True): (0.015, 0.94),
    ("fp8", False): (0.076, 0.84),
}


@pytest.fixture(scope="module", params=ARCHITECTURES)
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(request.param, tmp_path_factory.mktemp(request.param.lower()))


@pytest.mark.parametrize(("method", "head"), list(BOUNDS))
def test_quantized_logits_close_to_full_precision(checkpoint: Path, method: str, head: bool
                                                  ) -> None:
    prompts = random_prompts(301, [5, 1, 23, 9])
    base = load_model(resolve_model_config(str(checkpoint)), CPU)
    cfg = resolve_model_config(str(checkpoint), quantization=method, quantize_lm_head=head)
    model = load_model(cfg, CPU)
    ref, got = torch.cat(flatout_logits(base, prompts)), torch.cat(flatout_logits(model, prompts))
    rel = ((got - ref).norm() / ref.norm()).item()
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    max_rel, min_agree = BOUNDS[(method, head)]
    assert 0.005 < rel < max_rel and agree >= min_agree
    assert model.lm_head.weight.dtype == (torch.int8 if head and method == "int8"
                                          else torch.float32)


# Through the whole engine (chunked prefill, decode), greedy int8 tokens equal fp32's at
# 42-64 of the 64 positions per architecture (measured; random tiny models have near-tied
# logits, so one flip changes the rest of a sequence): at least 40 and the first 4 of each.
PROMPTS = [[5, 17, 42, 99, 7, 3], list(range(10, 90)), [200, 201], [9] * 33]
ENGINE = {"max_model_len": 256, "max_num_batched_tokens": 32, "num_kv_blocks": 64}
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def _generate(path: Path, **engine: object) -> list[list[int]]:
    llm = LLM(str(path), **{**ENGINE, **engine})
    try:
        return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        llm.engine.core.shutdown()


def test_int8_greedy_generation_agrees_with_full_precision(checkpoint: Path) -> None:
    want, got = _generate(checkpoint), _generate(checkpoint, quantization="int8")
    same = sum(a == b for w, g in zip(want, got, strict=True) for a, b in zip(w, g, strict=True))
    assert same >= 40 and all(w[:4] == g[:4] for w, g in zip(want, got, strict=True))


def test_int8_under_tensor_parallel_matches_one_rank(tmp_path: Path) -> None:
    """TP = 2 over gloo, int8: same tokens and logprobs as int8 on one rank."""
    path = make_tiny_checkpoint("GlmForCausalLM", tmp_path / "glm")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    outs = []
    for tp in (1, 2):
        llm = LLM(str(path), tensor_parallel_size=tp, quantization="int8", **ENGINE)
        try:
            outs.append([o.outputs[0] for o in llm.generate(PROMPTS, params)])
        finally:
            llm.engine.core.shutdown()
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]
    for a, b in zip(*outs, strict=True):
        assert [lp.logprob for lp in a.logprobs] == pytest.approx(
            [lp.logprob for lp in b.logprobs], abs=1e-4)


def test_dummy_weights_are_quantized(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("Glm4ForCausalLM", tmp_path / "g4")
    cfg = resolve_model_config(str(path), load_format="dummy", quantization="fp8")
    model = load_model(cfg, CPU)
    proj = model.model.layers[0].mlp.gate_up_proj
    assert proj.weight.dtype == torch.float8_e4m3fn
    assert (proj.weight_scale > 0).all() and (proj.weight_scale < 1e-3 / 400).all()
    assert proj.weight.float().abs().amax() == reference.FP8_MAX


def test_bad_quantization_requests_fail_at_startup(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="quantization: must be one of int8, fp8"):
        EngineArgs(quantization="int4")
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "tied", tie_word_embeddings=True)
    with pytest.raises(ValueError, match="quantize_lm_head: the LM head is tied"):
        resolve_model_config(str(path), quantization="int8", quantize_lm_head=True)
    with pytest.raises(ValueError, match="quantize_lm_head: needs --quantization"):
        resolve_model_config(str(path), quantize_lm_head=True)
    with pytest.raises(ValueError, match="unknown method 'awq'"):
        resolve_model_config(str(path), quantization="awq")
    # an FP8 request on a GPU without FP8 tensor cores names the alternative
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    with pytest.raises(ValueError, match=r"NVIDIA A10 is 8.6: use --quantization int8"):
        check_device("fp8", torch.device("cuda"))
    check_device("int8", torch.device("cuda"))
    # ChatGLM-6B v1 is quantized on load (tests/models/test_chatglm_v1.py checks its tokens)
    assert resolve_model_config("chatglm-6b", load_format="dummy",
                                quantization="int8").quantization == "int8"


def test_glm4v_text_decoder_quantized_vision_tower_not(tmp_path: Path) -> None:
    """GLM-4.1V: the M-RoPE text decoder's linears are int8 (measured: logits' relative error
    0.0139, top-1 18 of 19 positions), the vision tower stays in the model dtype."""
    from flatout.layers.attention import AttentionMetadata, forward_context
    from tests.helpers.tiny_checkpoints import make_tiny_glm4v_checkpoint

    path = make_tiny_glm4v_checkpoint(tmp_path / "v")
    base = load_model(resolve_model_config(str(path)), CPU)
    cfg = resolve_model_config(str(path), quantization="int8")
    model = load_model(cfg, CPU)
    prompts = random_prompts(cfg.vocab_size - 10, [7, 12])
    ids, pos = torch.cat(prompts), torch.cat([torch.arange(len(p)) for p in prompts])
    logits = []
    for m in (base, model):
        with forward_context(AttentionMetadata.for_prefill_without_cache([7, 12])):
            logits.append(m.compute_logits(m(ids, pos)))
    ref, got = logits
    assert 0.005 < ((got - ref).norm() / ref.norm()).item() < 0.016
    assert (got.argmax(-1) == ref.argmax(-1)).sum() >= 18
    assert model.model.language_model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    assert all(p.dtype == torch.float32 for p in model.model.visual.parameters())
