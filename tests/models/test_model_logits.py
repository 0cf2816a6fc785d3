"""Our models' logits over a flattened batch of prompts equal transformers' per prompt (fp32)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from flatout.models.registry import load_model, resolve_model_config
from tests.helpers.logits import flatout_logits, hf_logits, max_abs_diff, random_prompts
from tests.helpers.tiny_checkpoints import ARCHITECTURES, load_hf_reference, make_tiny_checkpoint

ATOL = 1e-4  # logits have std ~1; fp32 differences between the two paths are ~1e-6
LENS = [5, 1, 23, 9]
CPU = torch.device("cpu")


def _odd_shapes(arch: str) -> dict[str, Any]:
    # head_dim 80, GQA ratio 3, odd vocab; Qwen2 derives head_dim = hidden / heads
    hidden = 480 if arch == "Qwen2ForCausalLM" else 96
    return dict(head_dim=80, num_attention_heads=6, num_key_value_heads=2, hidden_size=hidden,
                vocab_size=257)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
CASES: list[tuple[str, dict[str, Any]]] = [
    *[(arch, {}) for arch in ARCHITECTURES],
    *[(arch, _odd_shapes(arch)) for arch in ARCHITECTURES],
    ("GlmForCausalLM", dict(num_key_value_heads=1)),  # MQA, like glm-4-9b's 16 q heads per kv head
    ("Glm4ForCausalLM", dict(partial_rotary_factor=0.25, attention_bias=False)),
    ("ChatGLMModel", dict(rope_ratio=50, attention_bias=False, num_key_value_heads=1)),
    ("LlamaForCausalLM", dict(tie_word_embeddings=True, attention_bias=True)),
    ("LlamaForCausalLM", dict(rope_theta=500000.0, rope_scaling=LLAMA3_SCALING)),
    ("Qwen2ForCausalLM", dict(tie_word_embeddings=True,
                              rope_scaling={"rope_type": "linear", "factor": 2.0})),
    ("Qwen3ForCausalLM", dict(attention_bias=True, num_key_value_heads=4)),
]


def _case_id(case: tuple[str, dict[str, Any]]) -> str:
    arch, kw = case
    return arch + "".join(f"-{k}={v}" for k, v in kw.items() if k != "rope_scaling") + (
        f"-{kw['rope_scaling']['rope_type']}" if "rope_scaling" in kw else ""
    )


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_logits_match_transformers(case: tuple[str, dict[str, Any]], tmp_path: Path) -> None:
    arch, overrides = case
    path = make_tiny_checkpoint(arch, tmp_path / "ckpt", **overrides)
    cfg = resolve_model_config(str(path))
    model = load_model(cfg, CPU)
    prompts = random_prompts(cfg.vocab_size, LENS + [40])
    ours = flatout_logits(model, prompts)
    expected = hf_logits(load_hf_reference(path), prompts)
    assert ours[0].dtype == torch.float32 and ours[0].shape == (LENS[0], cfg.vocab_size)
    assert max_abs_diff(ours, expected) < ATOL


# each change must be caught by the comparison above: proof that it can fail
SENSITIVITY = [
    ("GlmForCausalLM", dict(rope_interleaved=False)),
    ("GlmForCausalLM", dict(rotary_dim=16)),
    ("ChatGLMModel", dict(rope_theta=10000.0)),  # ignoring rope_ratio (3 -> base 30000)
    ("Glm4ForCausalLM", dict(sandwich_norm=False)),
    ("Qwen3ForCausalLM", dict(qk_norm=False)),
    ("LlamaForCausalLM", dict(rope_interleaved=True)),
]


@pytest.mark.parametrize("arch,change", SENSITIVITY, ids=[f"{a}-{c}" for a, c in SENSITIVITY])
def test_comparison_detects_a_wrong_model(
    arch: str, change: dict[str, Any], tmp_path: Path
) -> None:
    path = make_tiny_checkpoint(arch, tmp_path / "ckpt")
    cfg = dataclasses.replace(resolve_model_config(str(path)), **change)
    prompts = random_prompts(cfg.vocab_size, LENS)
    expected = hf_logits(load_hf_reference(path), prompts)
    if change.keys() & {"sandwich_norm", "qk_norm"}:  # parameters the checkpoint still has
        with pytest.raises(ValueError, match="does not use"):
            load_model(cfg, CPU)
        return
    assert max_abs_diff(flatout_logits(load_model(cfg, CPU), prompts), expected) > 1e-2


def test_bfloat16_model_stays_close(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("Glm4ForCausalLM", tmp_path / "ckpt")
    cfg = resolve_model_config(str(path), dtype="bfloat16")
    model = load_model(cfg, CPU)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    prompts = random_prompts(cfg.vocab_size, LENS)
    ours = flatout_logits(model, prompts)
    expected = hf_logits(load_hf_reference(path), prompts)
    assert ours[0].dtype == torch.float32
    assert max_abs_diff(ours, expected) < 0.15  # bf16 rounding through 2 layers (~0.07)
