"""`flatout plan` from the config alone, and the engine's startup refusal built on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatout.cli import main
from flatout.config import EngineArgs
from flatout.models.registry import resolve_model_config
from flatout.plan import GIB, check_fits, make_plan, parse_gpus, rank_param_count
from tests.helpers.tiny_checkpoints import make_tiny_checkpoint


def glm(max_model_len: int = 32768):  # noqa: ANN201
    return resolve_model_config("glm-4-9b", device_type="cuda", dtype="bfloat16",
                                max_model_len=max_model_len, load_format="dummy")


def test_parse_gpus() -> None:
    g = parse_gpus("2x24GB")
    assert (g.count, g.memory, g.bandwidth_known) == (2, 24 * 10**9, False)
    assert parse_gpus("4x80GiB").memory == 80 * GIB
    h = parse_gpus("2xH200")
    assert (h.count, h.name, h.bandwidth) == (2, "H200", 4800e9)
    assert parse_gpus("24GB", bandwidth=936e9).bandwidth == 936e9
    with pytest.raises(ValueError, match="unknown GPU"):
        parse_gpus("2xfoo")


def test_shards_add_up_to_the_model() -> None:
    cfg = glm()
    assert rank_param_count(cfg, 1) == cfg.num_params
    # tp 2: everything halves except the replicated norms (and the q/k/v biases' K/V halves)
    assert cfg.num_params / 2 < rank_param_count(cfg, 2) < cfg.num_params / 2 + 4096 * 200


@pytest.mark.parametrize("tp", [2, 4])
def test_plan_matches_the_real_shard_sizes(tmp_path: Path, tp: int) -> None:
    """The plan's per-rank weights equal the parameters each rank's model really holds."""
    from flatout.distributed import init_tensor_parallel
    from flatout.models.registry import load_model

    path = make_tiny_checkpoint("GlmForCausalLM", tmp_path / "g", num_key_value_heads=1,
                                vocab_size=300)
    cfg = resolve_model_config(str(path), load_format="dummy")
    try:
        for rank in range(tp):
            init_tensor_parallel(rank, tp)
            model = load_model(cfg, torch.device("cpu"))
            assert sum(p.numel() for p in model.parameters()) == rank_param_count(cfg, tp)
    finally:
        init_tensor_parallel(0, 1)


def test_glm4_9b_on_two_24gb_cards() -> None:
    plan = make_plan(glm(), parse_gpus("2x24GB"))
    assert plan.tp == 2 and plan.fits
    assert 8.5 * GIB < plan.weights < 9.0 * GIB  # ~9.4 B params / 2 in bf16
    assert plan.kv_per_token == 20 * 1024  # 1 of 2 KV heads per GPU: 20 KiB
    assert plan.kv_tokens > 400_000
    text = "\n".join(plan.lines())
    assert "fits      yes" in text and "decode floor" in text and "sequences of 32768" in text


def test_what_cannot_fit_is_refused_with_the_plan() -> None:
    one = make_plan(glm(131072), parse_gpus("1x16GB"))
    assert not one.fits and "exceed" in one.reason() and "tensor-parallel-size" in one.reason()
    args = EngineArgs(model="glm-4-9b", load_format="dummy", max_model_len=131072)
    with pytest.raises(ValueError, match="cannot fit: weights .* exceed") as e:
        check_fits(glm(131072), args, 16 * 10**9)
    assert "fits      NO" in str(e.value)
    tight = make_plan(glm(131072), parse_gpus("1x24GB"))
    assert not tight.fits and "lower --max-model-len to at most" in tight.reason()
    check_fits(glm(8192), EngineArgs(), 80 * 10**9)  # fits: no error


def test_plan_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "glm-4-9b", "--gpus", "2x24GB", "--max-model-len",
                 "32768"]) == 0
    assert "fits      yes" in capsys.readouterr().out
    assert main(["plan", "--model", "glm-4-9b", "--gpus", "1x16GB"]) == 1
    assert "fits      NO" in capsys.readouterr().out
    assert main(["plan", "--model", "glm-4-9b", "--gpus", "2x24GB", "--tp", "3"]) == 2


def test_fp8_kv_cache_doubles_the_tokens(capsys: pytest.CaptureFixture[str]) -> None:
    auto = make_plan(glm(8192), parse_gpus("1x24GB"))
    fp8 = make_plan(glm(8192), parse_gpus("1x24GB"), kv_cache_dtype="fp8")
    assert (auto.kv_per_token, fp8.kv_per_token) == (40 * 1024, 20 * 1024)  # bf16 vs 1 byte
    assert fp8.kv_budget == auto.kv_budget  # same memory, half the bytes per token
    # twice the tokens, up to the block rounding of the budget
    assert 2 * auto.kv_tokens <= fp8.kv_tokens < 2 * auto.kv_tokens + 2 * auto.block_size
    assert fp8.decode_floor(64) < auto.decode_floor(64)
    # a context that does not fit in bf16 fits in fp8; the startup check agrees
    bf16_max = auto.kv_tokens
    args = EngineArgs(model="glm-4-9b", load_format="dummy", max_model_len=bf16_max + 1024)
    with pytest.raises(ValueError, match="cannot fit"):
        check_fits(glm(bf16_max + 1024), args, 24 * 10**9)
    fp8_args = EngineArgs(model="glm-4-9b", load_format="dummy", max_model_len=bf16_max + 1024,
                          kv_cache_dtype="fp8")
    assert check_fits(glm(bf16_max + 1024), fp8_args, 24 * 10**9).fits
    assert main(["plan", "--model", "glm-4-9b", "--gpus", "1x24GB", "--max-model-len", "8192",
                 "--kv-cache-dtype", "fp8"]) == 0
    out = capsys.readouterr().out
    assert f"= {fp8.kv_tokens} tokens (20.0 KiB/token on each GPU, float8_e4m3fn)" in out


def test_vision_models_reserve_the_towers_activation_peak() -> None:
    """GLM-4.1V: the reserve covers the tower over the largest image (30,000 patches: more than
    the text forward at 4096 tokens) plus the encoder cache; a text model has neither."""
    from flatout.plan import activation_reserve, vision_activation_reserve

    vl = resolve_model_config("glm-4.1v-9b-thinking")
    text = resolve_model_config("glm-4-9b-0414")
    assert vision_activation_reserve(vl) > activation_reserve(text, 1, 4096, 256)
    assert activation_reserve(vl, 1, 4096, 256) == (
        vision_activation_reserve(vl) + 4096 * vl.hidden_size * vl.dtype_bytes)
    assert 1 << 30 < vision_activation_reserve(vl) < 4 << 30
