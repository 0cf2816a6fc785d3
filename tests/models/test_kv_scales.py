"""K/V cache scales from a checkpoint fill the attention layers' k_scale / v_scale (1.0 where
the checkpoint has none), and a scale we cannot use is a clear error naming the tensor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flatout.models.loader import CheckpointError
from flatout.models.registry import load_model, resolve_model_config
from tests.helpers.tiny_checkpoints import make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint("GlmForCausalLM", tmp_path_factory.mktemp("glm"))


def with_tensors(src: Path, dst: Path, extra: dict[str, torch.Tensor]) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    state = load_file(src / "model.safetensors")
    save_file({**state, **extra}, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def attn_scales(path: Path) -> list[tuple[float, float]]:
    model = load_model(resolve_model_config(str(path)), torch.device("cpu"))
    layers = [layer.self_attn.attn for layer in model.model.layers]
    return [(float(a.k_scale), float(a.v_scale)) for a in layers]


def test_scales_fill_the_attention_buffers(checkpoint: Path, tmp_path: Path) -> None:
    assert attn_scales(checkpoint) == [(1.0, 1.0), (1.0, 1.0)]  # none in the checkpoint
    path = with_tensors(checkpoint, tmp_path / "scaled", {
        "model.layers.0.self_attn.k_scale": torch.tensor(0.25),  # compressed-tensors / vLLM
        "model.layers.0.self_attn.v_scale": torch.tensor([0.5]),
        "model.layers.1.self_attn.k_proj.k_scale": torch.tensor(2.0),  # ModelOpt's names
    })  # fmt: skip
    assert attn_scales(path) == [(0.25, 0.5), (2.0, 1.0)]


@pytest.mark.parametrize(("name", "value", "error"), [
    ("model.layers.0.self_attn.k_scale", torch.tensor([0.5, 0.25]), "per-head KV scales"),
    ("model.layers.1.self_attn.v_scale", torch.tensor(0.0), "positive and finite"),
    ("model.layers.7.self_attn.k_scale", torch.tensor(1.0), "does not use"),  # no layer 7
])  # fmt: skip
def test_unusable_scales_are_refused(checkpoint: Path, tmp_path: Path, name: str,
                                     value: torch.Tensor, error: str) -> None:
    path = with_tensors(checkpoint, tmp_path / "bad", {name: value})
    with pytest.raises(CheckpointError, match=error) as e:
        attn_scales(path)
    assert name in str(e.value)
