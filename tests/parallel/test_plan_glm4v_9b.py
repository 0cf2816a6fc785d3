"""`flatout plan` for GLM-4V-9B (the `glm-4v-9b` preset): the EVA tower's activation peak over
the most images one step encodes is reserved, the tower counted in the weights but not in the
decode floor; on 2 x 24 GB (TP 2, bf16) and on 1 x 24 GB with --quantization int8 it fits, on
1 x 24 GB in bf16 it does not and says why; the per-GPU figures add up."""

from __future__ import annotations

import pytest

from flatout.cli import main
from flatout.models.registry import resolve_model_config
from flatout.plan import (
    GIB,
    eva_activation_reserve,
    make_plan,
    parse_gpus,
    rank_tower_bytes,
    rank_weight_bytes,
)


def _cfg(quantization: str | None = None):  # noqa: ANN202
    return resolve_model_config("glm-4v-9b", load_format="dummy", device_type="cuda",
                                quantization=quantization)


def _adds_up(plan) -> None:  # noqa: ANN001
    usable = int(plan.gpus.memory * plan.utilization)
    assert plan.weights + plan.activations + plan.overhead + plan.kv_budget == usable
    assert plan.kv_tokens * plan.kv_per_token <= plan.kv_budget


def test_two_24gb_cards_in_bf16() -> None:
    cfg = _cfg()
    eva = cfg.eva_vision
    assert eva is not None and eva.num_image_tokens == 1602
    plan = make_plan(cfg, parse_gpus("2x24GB"), max_num_batched_tokens=4096)
    assert plan.tp == 2 and plan.fits
    _adds_up(plan)
    assert plan.weights == rank_weight_bytes(cfg, 2)
    # 13.9 B params in bf16, the text stack and the tower's blocks halved per rank
    assert 12.5 * GIB < plan.weights < 13.5 * GIB
    assert plan.tower == rank_tower_bytes(cfg, 2) and 4.0 * GIB < plan.tower < 4.5 * GIB
    # a decode step reads the weights but the tower's
    floor = (plan.weights - plan.tower + plan.context * plan.kv_per_token) / plan.gpus.bandwidth
    assert plan.decode_floor(1) == pytest.approx(floor)
    assert plan.kv_tokens >= 8 * cfg.max_model_len  # room for several full-length sequences


def test_one_24gb_card_needs_int8() -> None:
    bf16 = make_plan(_cfg(), parse_gpus("24GB"))
    assert not bf16.fits and bf16.kv_budget < 0
    assert "use more GPUs" in bf16.reason()
    cfg = _cfg("int8")
    plan = make_plan(cfg, parse_gpus("24GB"))
    assert plan.fits
    _adds_up(plan)
    # int8 linears (text and tower) take a byte per weight: a little over half of bf16's
    assert 0.5 < plan.weights / bf16.weights < 0.6
    assert 13.5 * GIB < plan.weights < 15 * GIB
    assert plan.kv_tokens >= cfg.max_model_len


@pytest.mark.parametrize("budget", [1024, 4096, 8192])
def test_the_tower_reserve_scales_with_the_images_a_step_encodes(budget: int) -> None:
    cfg = _cfg()
    eva = cfg.eva_vision
    assert eva is not None
    images = eva.images_per_step(budget)
    assert images == max(1, budget // 1602)
    one = eva_activation_reserve(cfg, 1, 1)
    # per image: 6401 tokens through a block of width 1792 (MLP 15360): about half a GiB
    assert 0.4 * GIB < one < 0.7 * GIB
    assert eva_activation_reserve(cfg, 1, images) == images * one
    assert eva_activation_reserve(cfg, 2, 1) < one  # heads and MLP columns split over ranks
    plan = make_plan(cfg, parse_gpus("H200"), max_num_batched_tokens=budget)
    cached = max(budget, 1602) * cfg.hidden_size * cfg.dtype_bytes  # the encoder cache's rows
    assert plan.activations >= images * one + cached


def test_the_cli_prints_both(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", "--model", "glm-4v-9b", "--gpus", "2x24GB"]) == 0
    two = capsys.readouterr().out
    assert "fits      yes" in two and "vision tower" in two and "tensor parallel 2" in two
    assert main(["plan", "--model", "glm-4v-9b", "--gpus", "24GB",
                 "--quantization", "int8"]) == 0
    one = capsys.readouterr().out
    assert "fits      yes" in one and "linears int8, vision tower's too" in one
    assert main(["plan", "--model", "glm-4v-9b", "--gpus", "24GB"]) == 1
    assert "fits      NO" in capsys.readouterr().out
