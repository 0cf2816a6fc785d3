"""--kv-cache-dtype fp8 through the whole engine on a tiny model (the CPU runs the references):
greedy output against the model-dtype cache, the cache's capacity, and the flag's bad inputs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from flatout import LLM, SamplingParams
from flatout.config import CacheConfig, EngineArgs, add_engine_args, engine_args_from
from flatout.worker.kv_cache import kv_cache_dtype
from tests.helpers.tiny_checkpoints import make_tiny_checkpoint

PROMPT_LENS = [3, 70, 17, 41, 9, 100, 33, 5]
NEW_TOKENS = 24
KV_MEMORY = 1 << 20


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[LLM, list]]:
    path = make_tiny_checkpoint("GlmForCausalLM", tmp_path_factory.mktemp("glm"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 301, (n,), generator=g).tolist() for n in PROMPT_LENS]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)
    out = {}
    for dtype in ("auto", "fp8"):
        # chunked prefill (64-token steps) and decodes mixed, all over the paged cache
        llm = LLM(str(path), kv_cache_dtype=dtype, kv_cache_memory=KV_MEMORY,
                  max_num_batched_tokens=64, enable_prefix_caching=False)
        out[dtype] = (llm, llm.generate(prompts, params))
    return out


def test_fp8_cache_holds_float8_and_four_times_the_fp32_tokens(runs) -> None:  # noqa: ANN001
    auto, fp8 = runs["auto"][0].engine.core.runner, runs["fp8"][0].engine.core.runner
    assert auto.attn_layers[0].k_cache.dtype == torch.float32  # the CPU model's dtype
    assert fp8.attn_layers[0].k_cache.dtype == torch.float8_e4m3fn
    assert fp8.attn_layers[0].v_cache.dtype == torch.float8_e4m3fn
    # the same bytes hold 4x the tokens of an fp32 cache (2x those of a bf16 one)
    assert fp8.num_blocks == 4 * auto.num_blocks
    assert fp8.memory.kv_cache == auto.memory.kv_cache == KV_MEMORY
    assert runs["fp8"][0].engine.core.cache_config.num_blocks == fp8.num_blocks


def test_fp8_greedy_agrees_with_the_model_dtype_cache(runs) -> None:  # noqa: ANN001
    """Measured on this tiny random GLM (fp32): 6 of 8 sequences identical over 24 greedy
    tokens, 78% of all positions equal; on the tokens before the first divergence the chosen
    token's logprob differs by 0.013 on average, 0.060 at most."""
    auto, fp8 = runs["auto"][1], runs["fp8"][1]
    same = total = identical = 0
    diffs: list[float] = []
    for a, b in zip(auto, fp8, strict=True):
        x, y = a.outputs[0], b.outputs[0]
        same += sum(i == j for i, j in zip(x.token_ids, y.token_ids, strict=True))
        total += len(x.token_ids)
        identical += x.token_ids == y.token_ids
        pairs = list(zip(x.token_ids, y.token_ids, strict=True))
        n = next((i for i, (u, v) in enumerate(pairs) if u != v), len(pairs))
        diffs += [abs(p.logprob - q.logprob)
                  for p, q in zip(x.logprobs[:n], y.logprobs[:n], strict=True)]
    assert identical >= 6 and same / total >= 0.75, (identical, same / total)
    assert max(diffs) < 0.1 and sum(diffs) / len(diffs) < 0.025
    assert max(diffs) > 1e-4, "fp8 gave the model-dtype cache's logprobs: nothing was quantized"


def test_checkpoint_scales_are_used(runs) -> None:  # noqa: ANN001
    """A layer's k_scale/v_scale divide what the fp8 cache stores (1.0 unless the checkpoint
    gives them): other scales give other logprobs, and scales of a model-dtype cache do not."""
    prompt = [[5, 17, 33, 2, 99, 41, 7]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=0)

    def logprobs(llm: LLM) -> list[float]:
        return [t.logprob for t in llm.generate(prompt, params)[0].outputs[0].logprobs]

    for name, changes in (("fp8", True), ("auto", False)):
        llm = runs[name][0]
        layers = llm.engine.core.runner.attn_layers
        before = logprobs(llm)
        try:
            for layer in layers:
                layer.k_scale.fill_(1 / 64)  # K / (1/64) saturates at 448 more often
                layer.v_scale.fill_(3.0)
            after = logprobs(llm)
        finally:
            for layer in layers:
                layer.k_scale.fill_(1.0)
                layer.v_scale.fill_(1.0)
        assert (before != after) == changes, name
        assert logprobs(llm) == before


def test_bad_kv_cache_dtype_is_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype: must be one of auto, fp8"):
        EngineArgs(kv_cache_dtype="fp8_e5m2")
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    assert engine_args_from(parser.parse_args(["--kv-cache-dtype", "fp8"])).kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int8"])


def test_fp8_on_a_gpu_without_fp8_conversions_is_a_startup_error(monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    cuda = torch.device("cuda", 0)
    fp8 = CacheConfig(block_size=16, enable_prefix_caching=True, cache_dtype="fp8")
    with pytest.raises(ValueError, match=r"A100 \(compute capability 8.0\).*--kv-cache-dtype auto"):
        kv_cache_dtype(fp8, torch.bfloat16, cuda)
    auto = CacheConfig(block_size=16, enable_prefix_caching=True)
    assert kv_cache_dtype(auto, torch.bfloat16, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert kv_cache_dtype(fp8, torch.bfloat16, cuda) == torch.float8_e4m3fn
    assert kv_cache_dtype(fp8, torch.float32, torch.device("cpu")) == torch.float8_e4m3fn


def test_resolve_normalises_the_cache_dtype(tmp_path: Path) -> None:
    from flatout.models.registry import resolve_model_config

    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "llama")
    cfg = resolve_model_config(str(path))
    for given, want in (("auto", "auto"), ("fp8", "fp8"), ("fp8_e4m3", "fp8")):
        assert EngineArgs(kv_cache_dtype=given).resolve(cfg).cache.cache_dtype == want
    assert cfg.kv_cache_bytes_per_token("fp8") * 4 == cfg.kv_bytes_per_token  # fp32 model


def test_serve_help_documents_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    from flatout.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--kv-cache-dtype {auto,fp8,fp8_e4m3}" in text
    assert "auto (K/V in the model's dtype) or fp8 (float8 e4m3" in text
    assert "compute capability 8.9+" in text
