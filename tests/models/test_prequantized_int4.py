"""Pre-quantized 4-bit checkpoints (W4A16) as they ship, converted on load to flatout's layout:
compressed-tensors pack-quantized ones written by the `compressed-tensors` library's own
compressor, GPTQ and AWQ ones packed here by their published layouts. Each loads with
--quantization inferred, holds exactly the weights the file encodes, gives the logits of a dense
model holding those weights, shards under tensor parallelism, and what flatout cannot serve is
refused at startup naming the field."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from flatout import distributed
from flatout.kernels import reference
from flatout.models.loader import CheckpointError
from flatout.models.registry import load_model, resolve_model_config
from tests.helpers.logits import flatout_logits, random_prompts
from tests.helpers.quantized_checkpoints import (
    dequantized_linears,
    make_awq_checkpoint,
    make_compressed_tensors_checkpoint,
    make_dense_twin,
    make_gptq_checkpoint,
)
from tests.helpers.tiny_checkpoints import make_tiny_checkpoint

CPU = torch.device("cpu")
# compressed-tensors scheme -> the method flatout serves it as
CT_SCHEMES = {
    "W4A16-g32": "w4a16-g32",
    "W4A16-g32-asym": "w4a16-g32-asym",
    "W4A16-channel": "w4a16-channel",
    "W4A16-channel-asym": "w4a16-channel-asym",
}


@pytest.fixture(autouse=True)
def _single_rank() -> Iterator[None]:
    yield
    distributed.init_tensor_parallel(0, 1)


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("int4-bases")
    out = {}
    for arch in ("LlamaForCausalLM", "Glm4ForCausalLM"):
        out[arch] = make_tiny_checkpoint(arch, d / arch)
        # intermediate 128: down_proj's inputs are whole groups of 64
        out[f"{arch}-128"] = make_tiny_checkpoint(arch, d / f"{arch}-128", intermediate_size=128)
    return out


def dequantized_layer(model: torch.nn.Module, i: int) -> dict[str, torch.Tensor]:
    """Layer i's linears as the model holds them, dequantized (fp32)."""
    layer = model.model.layers[i]
    out = {}
    for name, lin in (("qkv", layer.self_attn.qkv_proj), ("o", layer.self_attn.o_proj),
                      ("gate_up", layer.mlp.gate_up_proj), ("down", layer.mlp.down_proj)):
        assert lin.weight.dtype == torch.uint8
        out[name] = reference.dequantize_w4(lin.weight, lin.weight_scale, lin.weight_zero_point)
    return out


def checkpoint_layer(deq: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    p = f"model.layers.{i}."
    gate_up = deq.get(p + "mlp.gate_up_proj")  # GLM's fused checkpoint linear
    if gate_up is None:
        gate_up = torch.cat([deq[p + "mlp.gate_proj"], deq[p + "mlp.up_proj"]])
    return {
        "qkv": torch.cat([deq[p + f"self_attn.{x}_proj"] for x in "qkv"]),
        "o": deq[p + "self_attn.o_proj"],
        "gate_up": gate_up,
        "down": deq[p + "mlp.down_proj"],
    }


def check_against_dense_twin(path: Path, base: Path, method: str, tmp: Path,
                             hf_names: bool = True) -> None:
    """The model holds what the file encodes (checked by name in transformers' layout) and
    gives the dense twin's logits."""
    cfg = resolve_model_config(str(path))
    assert cfg.quantization == method  # inferred from quantization_config
    model = load_model(cfg, CPU)
    deq = dequantized_linears(path)
    for i in range(cfg.num_hidden_layers if hf_names else 0):
        got = dequantized_layer(model, i)
        for part, want in checkpoint_layer(deq, i).items():
            torch.testing.assert_close(got[part], want, rtol=1e-6, atol=1e-7, msg=part)
    dense = load_model(resolve_model_config(str(make_dense_twin(path, base, tmp))), CPU)
    prompts = random_prompts(301, [5, 1, 23, 9])
    ref = torch.cat(flatout_logits(dense, prompts))
    got_logits = torch.cat(flatout_logits(model, prompts))
    assert ((got_logits - ref).norm() / ref.norm()).item() < 1e-5
    # ... and 4 bits are not the original weights
    original = load_model(resolve_model_config(str(base)), CPU)
    ref0 = torch.cat(flatout_logits(original, prompts))
    assert ((got_logits - ref0).norm() / ref0.norm()).item() > 0.02


# -- compressed-tensors pack-quantized -------------------------------------------------------
# GLM-4 (its checkpoint's fused gate_up split with its groups) runs the grouped schemes
@pytest.mark.parametrize(("arch", "scheme"), [("LlamaForCausalLM", s) for s in CT_SCHEMES]
                         + [("Glm4ForCausalLM", s) for s in ("W4A16-g32", "W4A16-g32-asym")])
def test_compressed_tensors_pack_quantized_loads_as_written(bases: dict[str, Path], arch: str,
                                                            scheme: str, tmp_path: Path) -> None:
    path = make_compressed_tensors_checkpoint(bases[arch], tmp_path / scheme, scheme)
    check_against_dense_twin(path, bases[arch], CT_SCHEMES[scheme], tmp_path / "dense")


@pytest.mark.parametrize("scheme", ["W4A16-g32-asym", "W4A16-channel"])
def test_tensor_parallel_shards_packed_weights_scales_and_zero_points(scheme: str,
                                                                      tmp_path: Path) -> None:
    """TP = 2 (intermediate 128: each rank's down_proj holds 2 whole groups of 32): rank r's
    dequantized q|k|v and gate|up rows and its half of o/down's columns are the TP = 1
    model's."""
    base = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "base", intermediate_size=128)
    cfg = resolve_model_config(str(make_compressed_tensors_checkpoint(base, tmp_path / "q",
                                                                      scheme)))
    one = dequantized_layer(load_model(cfg, CPU), 0)
    ranks = []
    for r in range(2):
        distributed.init_tensor_parallel(r, 2)
        ranks.append(dequantized_layer(load_model(cfg, CPU), 0))
    q, kv, inter = 4 * 16, 2 * 16, 128
    for r, got in enumerate(ranks):
        qkv = one["qkv"].split([q, kv, kv])
        assert torch.equal(got["qkv"], torch.cat([t.chunk(2)[r] for t in qkv]))
        gate_up = one["gate_up"].split([inter, inter])
        assert torch.equal(got["gate_up"], torch.cat([t.chunk(2)[r] for t in gate_up]))
        assert torch.equal(got["o"], one["o"].chunk(2, dim=1)[r])
        assert torch.equal(got["down"], one["down"].chunk(2, dim=1)[r])


def _edit_weights(path: Path, **fields: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(fields)
    (path / "config.json").write_text(json.dumps(config))


def test_what_cannot_be_served_is_refused_at_startup(bases: dict[str, Path],
                                                     tmp_path: Path) -> None:
    path = make_compressed_tensors_checkpoint(bases["LlamaForCausalLM"], tmp_path / "ct",
                                              "W4A16-g32-asym")
    # --quantization w4a16 takes the checkpoint's groups and zero points; int8 cannot
    assert resolve_model_config(str(path), quantization="w4a16").quantization == \
        "w4a16-g32-asym"
    with pytest.raises(ValueError, match=r"\(w4a16-g32-asym weights\), which cannot be served "
                                         r"as 'int8'"):
        resolve_model_config(str(path), quantization="int8")
    with pytest.raises(ValueError, match="quantize_lm_head: not with a pre-quantized"):
        resolve_model_config(str(path), quantize_lm_head=True)
    # a row-parallel split that cuts a group: refused when the model is built
    distributed.init_tensor_parallel(0, 2)
    with pytest.raises(ValueError, match="48 inputs per rank are not whole groups of 32"):
        load_model(resolve_model_config(str(path)), CPU)
    distributed.init_tensor_parallel(0, 1)

    def copy() -> Path:
        n = len(list(tmp_path.iterdir()))
        return Path(shutil.copytree(path, tmp_path / f"bad-{n}"))

    bad = copy()
    _edit_weights(bad, group_size=16)
    with pytest.raises(ValueError, match="group size 16 is not supported"):
        resolve_model_config(str(bad))
    bad = copy()
    _edit_weights(bad, num_bits=3)
    with pytest.raises(ValueError, match="3-bit int weights, group strategy, asymmetric is not "
                                         "supported"):
        resolve_model_config(str(bad))
    bad = copy()
    _edit_weights(bad, strategy="tensor", group_size=None)
    with pytest.raises(ValueError, match="4-bit int weights, tensor strategy, asymmetric is "
                                         "not supported"):
        resolve_model_config(str(bad))
    # a file whose packed weight does not fit its recorded shape: refused naming the module
    bad = copy()
    from safetensors.torch import load_file, save_file

    state = load_file(str(bad / "model.safetensors"))
    state["model.layers.1.mlp.down_proj.weight_shape"] = torch.tensor([64, 100])
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"4-bit weight model.layers.1.mlp.down_proj: "
                                              r"weight_packed has shape \(64, 12\), expected"):
        load_model(resolve_model_config(str(bad)), CPU)


# -- GPTQ and AWQ ------------------------------------------------------------------------------
# (group, sym, v1 format) -> the method served
GPTQ_CASES = {
    (32, True, True): "w4a16-g32",
    (32, False, True): "w4a16-g32-asym",
    (64, False, False): "w4a16-g64-asym",  # gptq_v2: zeros stored as they are
    (0, False, True): "w4a16-channel-asym",  # group_size -1
}


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Glm4ForCausalLM"])
@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_gptq_loads_as_packed(bases: dict[str, Path], arch: str, case: tuple[int, bool, bool],
                              tmp_path: Path) -> None:
    group, sym, v1 = case
    base = bases[f"{arch}-128" if group == 64 else arch]
    path = make_gptq_checkpoint(base, tmp_path / "gptq", group, sym, v1)
    check_against_dense_twin(path, base, GPTQ_CASES[case], tmp_path / "dense")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Glm4ForCausalLM"])
@pytest.mark.parametrize("group", [32, 64])
def test_awq_gemm_loads_as_packed(bases: dict[str, Path], arch: str, group: int,
                                  tmp_path: Path) -> None:
    base = bases[f"{arch}-128" if group == 64 else arch]
    path = make_awq_checkpoint(base, tmp_path / "awq", group)
    check_against_dense_twin(path, base, f"w4a16-g{group}-asym", tmp_path / "dense")


def test_remote_code_chatglm_layout_loads_gptq_and_awq(tmp_path: Path) -> None:
    """glm-4-9b-chat's remote-code layout: its fused query_key_value and dense_h_to_4h are
    4-bit as one linear each, split into q|k|v and gate|up with their groups on load."""
    base = make_tiny_checkpoint("ChatGLMModel", tmp_path / "base")
    for name, path in (("gptq", make_gptq_checkpoint(base, tmp_path / "gptq", 32, sym=False)),
                       ("awq", make_awq_checkpoint(base, tmp_path / "awq", 32))):
        check_against_dense_twin(path, base, "w4a16-g32-asym", tmp_path / f"dense-{name}",
                                 hf_names=False)


def _edit_config(path: Path, **fields: object) -> None:
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(fields)
    (path / "config.json").write_text(json.dumps(config))


def test_gptq_and_awq_that_cannot_be_served_are_refused(bases: dict[str, Path],
                                                        tmp_path: Path) -> None:
    base = bases["LlamaForCausalLM"]
    gptq = make_gptq_checkpoint(base, tmp_path / "gptq", 32, sym=False)
    awq = make_awq_checkpoint(base, tmp_path / "awq", 32)

    def copy(src: Path) -> Path:
        n = len(list(tmp_path.iterdir()))
        return Path(shutil.copytree(src, tmp_path / f"bad-{n}"))

    for src, fields, message in [
        (gptq, {"desc_act": True}, "gptq .act-order: g_idx permutes the groups. desc_act=True "
                                   "is not supported"),
        (gptq, {"bits": 8}, "gptq bits=8 is not supported"),
        (gptq, {"bits": 3}, "gptq bits=3 is not supported"),
        (gptq, {"group_size": 16}, "group size 16 is not supported"),
        (gptq, {"group_size": 0}, "gptq group_size=0 is not supported"),
        (gptq, {"checkpoint_format": "marlin"}, "gptq checkpoint_format='marlin' is not "
                                                "supported"),
        (gptq, {"lm_head": True}, "lm_head=true: the LM head is quantized"),
        (awq, {"version": "gemv"}, "awq version='gemv' is not supported"),
        (awq, {"bits": 8}, "awq bits=8 is not supported"),
        (awq, {"zero_point": False}, "awq zero_point=False is not supported"),
    ]:
        bad = copy(src)
        _edit_config(bad, **fields)
        with pytest.raises(ValueError, match=message):
            resolve_model_config(str(bad))
    # act-order weights whose config says otherwise: their g_idx is refused on load
    from safetensors.torch import load_file, save_file

    bad = copy(gptq)
    state = load_file(str(bad / "model.safetensors"))
    name = "model.layers.0.self_attn.o_proj.g_idx"
    state[name] = state[name].flip(0).contiguous()
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(CheckpointError, match="o_proj: g_idx is not in input order"):
        load_model(resolve_model_config(str(bad)), CPU)
    # symmetric GPTQ whose zero points are not 8
    bad = copy(gptq)
    _edit_config(bad, sym=True)
    with pytest.raises(CheckpointError, match="qzeros: symmetric weights with zero points other "
                                              "than 8"):
        load_model(resolve_model_config(str(bad)), CPU)


# -- through the whole engine --------------------------------------------------------------------
PROMPTS = [[5, 17, 42, 99, 7, 3], list(range(10, 90)), [200, 201], [9] * 33]
ENGINE = {"max_model_len": 256, "max_num_batched_tokens": 32, "num_kv_blocks": 64}


def _generate(path: Path, **engine: object) -> list:
    from flatout import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    llm = LLM(str(path), **{**ENGINE, **engine})
    try:
        return [o.outputs[0] for o in llm.generate(PROMPTS, params)]
    finally:
        llm.engine.core.shutdown()


def test_engine_serves_a_gptq_checkpoint_as_its_dense_twin_and_over_two_ranks(
        tmp_path: Path) -> None:
    """Chunked prefill and decode of an asymmetric GPTQ checkpoint (intermediate 128: whole
    groups on each rank): the dense twin's greedy tokens and logprobs on one rank, and the
    same over TP = 2 (gloo)."""
    base = make_tiny_checkpoint("GlmForCausalLM", tmp_path / "base", intermediate_size=128)
    path = make_gptq_checkpoint(base, tmp_path / "gptq", 32, sym=False)
    dense = _generate(make_dense_twin(path, base, tmp_path / "dense"))
    for got in (_generate(path), _generate(path, tensor_parallel_size=2)):
        assert [o.token_ids for o in got] == [o.token_ids for o in dense]
        for a, b in zip(got, dense, strict=True):
            assert [lp.logprob for lp in a.logprobs] == pytest.approx(
                [lp.logprob for lp in b.logprobs], abs=1e-4)
