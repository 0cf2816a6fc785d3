"""Quantized weights counted at their real size: `flatout plan` / `flatout info`, the startup
refusal built on the plan, and the bytes MBU divides by."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatout.cli import main
from flatout.config import EngineArgs
from flatout.distributed import init_tensor_parallel
from flatout.models.registry import load_model, resolve_model_config
from flatout.monitor.step_clock import StepCost
from flatout.plan import check_fits, make_plan, parse_gpus, rank_weight_bytes
from tests.helpers.tiny_checkpoints import make_tiny_checkpoint


def _held_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


@pytest.mark.parametrize(("method", "head"), [("int8", False), ("fp8", False), ("int8", True),
                                              (None, False)])
@pytest.mark.parametrize("tp", [1, 2])
def test_counted_bytes_are_the_bytes_each_rank_holds(tmp_path: Path, method: str | None,
                                                     head: bool, tp: int) -> None:
    path = make_tiny_checkpoint("Glm4ForCausalLM", tmp_path / "g", num_key_value_heads=1,
                                vocab_size=301)
    cfg = resolve_model_config(str(path), load_format="dummy", dtype="bfloat16",
                               quantization=method, quantize_lm_head=head)
    try:
        for rank in range(tp):
            init_tensor_parallel(rank, tp)
            held = _held_bytes(load_model(cfg, torch.device("cpu")))
            if rank == 0:  # rank 0 holds the most vocabulary rows: the plan's figure
                assert held == rank_weight_bytes(cfg, tp)
    finally:
        init_tensor_parallel(0, 1)
    if tp == 1:
        assert cfg.weight_bytes == held


def glm(method: str | None, head: bool = False):  # noqa: ANN201
    return resolve_model_config("glm-4-9b", device_type="cuda", dtype="bfloat16",
                                max_model_len=32768, load_format="dummy",
                                quantization=method, quantize_lm_head=head)


def test_glm4_9b_fits_one_24gb_card_only_quantized() -> None:
    gpus = parse_gpus("1x24GB")
    bf16, int8, fp8 = make_plan(glm(None), gpus), make_plan(glm("int8"), gpus), make_plan(
        glm("fp8"), gpus)
    assert not bf16.fits and int8.fits and fp8.fits
    # the linears (8.17 B weights) drop from 2 bytes to 1 + 4-byte scales per channel
    saved = bf16.weights - int8.weights
    assert 8.1e9 < saved < 8.2e9 and int8.weights == fp8.weights
    assert int8.kv_tokens > 150_000
    # int8 prefill converts gate_up (2 x 13696 x 4096 bf16) for cuBLAS: reserved
    assert int8.activations - fp8.activations == 2 * 13696 * 4096 * 2
    args = EngineArgs(model="glm-4-9b", quantization="int8", max_model_len=32768)
    check_fits(glm("int8"), args, 24 * 10**9)  # the engine's refusal agrees
    with pytest.raises(ValueError, match="cannot fit"):
        check_fits(glm(None), EngineArgs(model="glm-4-9b", max_model_len=32768), 24 * 10**9)


def test_mbu_divides_by_the_quantized_bytes() -> None:
    bf16, int8 = StepCost.of(glm(None)), StepCost.of(glm("int8", head=True))
    table = 151552 * 4096 * 2  # the embedding is gathered, not read, and stays bf16
    assert bf16.weight_bytes == glm(None).weight_bytes - table
    assert int8.weight_bytes == glm("int8", head=True).weight_bytes - table
    assert 0.5 < int8.weight_bytes / bf16.weight_bytes < 0.51


def test_plan_and_info_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "glm-4-9b", "--gpus", "1x24GB", "--max-model-len",
                 "32768"]) == 1
    assert "fits      NO" in capsys.readouterr().out
    assert main(["plan", "--model", "glm-4-9b", "--gpus", "1x24GB", "--max-model-len", "32768",
                 "--quantization", "int8"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 (linears int8)" in out and "fits      yes" in out
    assert main(["info", "--model", "glm-4-9b", "--load-format", "dummy", "--quantization",
                 "fp8", "--quantize-lm-head"]) == 0
    out = capsys.readouterr().out
    assert "weights: 10.03 GB in bfloat16 (linears fp8 incl. LM head" in out
    with pytest.raises(SystemExit):
        main(["plan", "--model", "glm-4-9b", "--gpus", "1x24GB", "--quantization", "int4"])
    assert "invalid choice: 'int4'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["w4a16-g32", "w4a16-g32-asym", "w4a16-channel-asym"])
@pytest.mark.parametrize("tp", [1, 2])
def test_4bit_bytes_are_the_bytes_each_rank_holds(tmp_path: Path, method: str, tp: int) -> None:
    """Half a byte a weight, an fp32 scale (and a one-byte zero point when asymmetric) a row
    and group; intermediate 128: whole groups on each rank's down_proj."""
    path = make_tiny_checkpoint("Glm4ForCausalLM", tmp_path / "g", num_key_value_heads=1,
                                vocab_size=301, intermediate_size=128)
    cfg = resolve_model_config(str(path), load_format="dummy", dtype="bfloat16",
                               quantization=method)
    try:
        for rank in range(tp):
            init_tensor_parallel(rank, tp)
            held = _held_bytes(load_model(cfg, torch.device("cpu")))
            if rank == 0:
                assert held == rank_weight_bytes(cfg, tp)
    finally:
        init_tensor_parallel(0, 1)
    if tp == 1:
        assert cfg.weight_bytes == held


def test_glm4_9b_in_4_bits(capsys: pytest.CaptureFixture[str]) -> None:
    gpus = parse_gpus("1x24GB")
    bf16, int8, w4 = (make_plan(glm(m), gpus) for m in (None, "int8", "w4a16"))
    assert w4.fits
    # the linears' 8.17 B weights: half a byte plus a 4-byte scale per 128 of them
    saved = bf16.weights - w4.weights
    assert 1.46 * 8.17e9 < saved < 1.47 * 8.2e9
    assert w4.kv_tokens > int8.kv_tokens
    assert w4.activations == int8.activations  # prefill dequantizes gate_up like int8
    assert StepCost.of(glm("w4a16")).weight_bytes < 0.35 * StepCost.of(glm(None)).weight_bytes
    assert main(["plan", "--model", "glm-4-9b", "--gpus", "1x24GB", "--max-model-len", "32768",
                 "--quantization", "w4a16"]) == 0
    out = capsys.readouterr().out
    assert "bfloat16 (linears w4a16)" in out and "fits      yes" in out
    assert main(["info", "--model", "glm-4-9b", "--load-format", "dummy", "--quantization",
                 "w4a16"]) == 0
    assert "(linears w4a16 at 4 bits + fp32 scales per group)" in capsys.readouterr().out


def test_plan_refuses_a_tensor_parallel_split_that_cuts_4bit_groups() -> None:
    gpus = parse_gpus("2xH100")
    with pytest.raises(ValueError, match=r"the MLP down projection has 13696 / 2 = 6848 inputs "
                                         r"per rank, not whole 4-bit groups of 128. Sizes that "
                                         r"work: 1$"):
        make_plan(glm("w4a16"), gpus)
    assert make_plan(glm("w4a16-g64"), gpus).fits  # 6848 = 107 groups of 64
    assert make_plan(glm("w4a16-channel-asym"), gpus).fits
