"""Pre-quantized checkpoints: compressed-tensors ones written by the `compressed-tensors`
library and `quant_method: fp8` ones load with --quantization inferred, hold exactly the
weights the file encodes (block-scaled ones: requantized per channel), shard under tensor
parallelism, and anything else is refused before loading."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flatout import distributed
from flatout.models.loader import CheckpointError
from flatout.models.registry import load_model, resolve_model_config
from tests.helpers.logits import flatout_logits, random_prompts
from tests.helpers.quantized_checkpoints import (
    dequantized_linears,
    make_compressed_tensors_checkpoint,
    make_fp8_checkpoint,
)
from tests.helpers.tiny_checkpoints import make_tiny_checkpoint

CPU = torch.device("cpu")
# name -> (method served, logits' relative error vs the fp32 original: measured 0.0108 for
# int8, 0.059-0.060 for fp8 per channel / tensor, 0.078 for fp8 blocks requantized per channel)
CASES = {
    "W8A16": ("int8", 0.012),
    "W8A8": ("int8", 0.012),  # int8 weights exactly; activations stay 16-bit
    "FP8_DYNAMIC": ("fp8", 0.065),
    "FP8": ("fp8", 0.065),
    "FP8_BLOCK": ("fp8", 0.085),
    "fp8-tensor": ("fp8", 0.065),
    "fp8-block": ("fp8", 0.085),
}
BLOCKED = ("FP8_BLOCK", "fp8-block")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("prequantized")
    base = make_tiny_checkpoint("LlamaForCausalLM", d / "base")
    paths = {"base": base}
    for scheme in ("W8A16", "W8A8", "FP8_DYNAMIC", "FP8", "FP8_BLOCK"):
        paths[scheme] = make_compressed_tensors_checkpoint(base, d / scheme, scheme)
    paths["fp8-tensor"] = make_fp8_checkpoint(base, d / "fp8-tensor")
    paths["fp8-block"] = make_fp8_checkpoint(base, d / "fp8-block", block=(32, 32))
    return paths


def _layer_weights(model: torch.nn.Module, i: int) -> dict[str, torch.Tensor]:
    layer = model.model.layers[i]
    out = {}
    for name, lin in (("qkv", layer.self_attn.qkv_proj), ("o", layer.self_attn.o_proj),
                      ("gate_up", layer.mlp.gate_up_proj), ("down", layer.mlp.down_proj)):
        out[name] = lin.weight.float() * lin.weight_scale[:, None]
    return out


def _checkpoint_layer(deq: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    return {
        "qkv": torch.cat([deq[p + f"self_attn.{x}_proj"] for x in "qkv"]),
        "o": deq[p + "self_attn.o_proj"],
        "gate_up": torch.cat([deq[p + "mlp.gate_proj"], deq[p + "mlp.up_proj"]]),
        "down": deq[p + "mlp.down_proj"],
    }


@pytest.mark.parametrize("name", list(CASES))
def test_loads_the_weights_the_checkpoint_encodes(checkpoints: dict[str, Path], name: str
                                                  ) -> None:
    method, max_rel = CASES[name]
    cfg = resolve_model_config(str(checkpoints[name]))
    assert cfg.quantization == method  # inferred from quantization_config
    model = load_model(cfg, CPU)
    deq = dequantized_linears(checkpoints[name])
    for i in range(cfg.num_hidden_layers):
        for part, want in _checkpoint_layer(deq, i).items():
            got = _layer_weights(model, i)[part]
            if name in BLOCKED:  # per-channel e4m3 again: within one rounding of the row max
                step = want.abs().amax(dim=1, keepdim=True) * 2**-4
                assert ((got - want).abs() <= step).all(), part
                assert not torch.equal(got, want)
            else:
                assert torch.equal(got, want), part
    base = load_model(resolve_model_config(str(checkpoints["base"])), CPU)
    prompts = random_prompts(301, [5, 1, 23, 9])
    ref, got = torch.cat(flatout_logits(base, prompts)), torch.cat(flatout_logits(model, prompts))
    assert 0.005 < ((got - ref).norm() / ref.norm()).item() < max_rel


@pytest.mark.parametrize("name", ["FP8", "W8A16"])
def test_tensor_parallel_shards_weights_and_their_scales(checkpoints: dict[str, Path],
                                                         name: str) -> None:
    """TP = 2: rank r's fused q|k|v and gate|up rows (with per-tensor scales repeated over
    each part's rows) and its half of o/down's columns (all scales) are the TP = 1 model's."""
    cfg = resolve_model_config(str(checkpoints[name]))
    one = _layer_weights(load_model(cfg, CPU), 0)
    try:
        ranks = []
        for r in range(2):
            distributed.init_tensor_parallel(r, 2)
            ranks.append(_layer_weights(load_model(cfg, CPU), 0))
    finally:
        distributed.init_tensor_parallel(0, 1)
    q, kv, inter = 4 * 16, 2 * 16, 96
    for r, got in enumerate(ranks):
        qkv = one["qkv"].split([q, kv, kv])
        assert torch.equal(got["qkv"], torch.cat([t.chunk(2)[r] for t in qkv]))
        gate_up = one["gate_up"].split([inter, inter])
        assert torch.equal(got["gate_up"], torch.cat([t.chunk(2)[r] for t in gate_up]))
        assert torch.equal(got["o"], one["o"].chunk(2, dim=1)[r])
        assert torch.equal(got["down"], one["down"].chunk(2, dim=1)[r])


def _edit_config(path: Path, **quant: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(quant)
    (path / "config.json").write_text(json.dumps(config))


def test_what_cannot_be_served_is_refused_at_startup(checkpoints: dict[str, Path],
                                                     tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"fp8 \(per tensor\) \(fp8 weights\), which cannot be "
                                         r"served as 'int8'"):
        resolve_model_config(str(checkpoints["fp8-tensor"]), quantization="int8")
    # block scales are dequantized on load anyway: int8 is requantized from them
    cfg = resolve_model_config(str(checkpoints["fp8-block"]), quantization="int8")
    model = load_model(cfg, CPU)
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    with pytest.raises(ValueError, match="quantize_lm_head: not with a pre-quantized"):
        resolve_model_config(str(checkpoints["W8A16"]), quantize_lm_head=True)

    def copy(name: str) -> Path:
        import shutil

        n = len(list(tmp_path.iterdir()))
        return Path(shutil.copytree(checkpoints[name], tmp_path / f"{name}-{n}"))

    bad = copy("W8A16")
    _edit_config(bad, ignore=[])
    with pytest.raises(ValueError, match="the LM head is quantized in this checkpoint"):
        resolve_model_config(str(bad))
    bad = copy("W8A16")
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(
        num_bits=4, strategy="group", group_size=32)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="4-bit int weights, group strategy is not supported"):
        resolve_model_config(str(bad))
    bad = copy("fp8-tensor")
    _edit_config(bad, quant_method="bitsandbytes")
    with pytest.raises(ValueError, match="quant_method 'bitsandbytes' is not supported"):
        resolve_model_config(str(bad))
    # a scale missing from the files: refused before any tensor is read
    bad = copy("fp8-tensor")
    state = load_file(str(bad / "model.safetensors"))
    del state["model.layers.1.mlp.down_proj.weight_scale"]
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks tensors for: model.layers.1.mlp.down_proj"
                                              r".weight_scale"):
        load_model(resolve_model_config(str(bad)), CPU)


@pytest.fixture(autouse=True)
def _single_rank() -> Iterator[None]:
    yield
    distributed.init_tensor_parallel(0, 1)
