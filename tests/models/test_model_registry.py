"""resolve_model_config, presets, sizes from the config, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from flatout.models.hf_config import SUPPORTED_ARCHITECTURES
from flatout.models.presets import PRESETS
from flatout.models.registry import load_model, model_info_lines, resolve_model_config
from tests.helpers.tiny_checkpoints import ARCHITECTURES, make_tiny_checkpoint

GLM_STOPS = (151329, 151336, 151338)


def _hf_config_for_preset(name: str) -> transformers.PreTrainedConfig:
    raw = dict(PRESETS[name].config)
    arch = raw["architectures"][0]
    if arch == "ChatGLMModel":  # the same network in transformers' layout
        return transformers.GlmConfig(
            vocab_size=raw["padded_vocab_size"], hidden_size=raw["hidden_size"],
            intermediate_size=raw["ffn_hidden_size"], num_hidden_layers=raw["num_layers"],
            num_attention_heads=raw["num_attention_heads"],
            num_key_value_heads=raw["multi_query_group_num"], head_dim=raw["kv_channels"],
            pad_token_id=raw["pad_token_id"],
        )
    cls = {"GlmForCausalLM": "GlmConfig", "Glm4ForCausalLM": "Glm4Config",
           "LlamaForCausalLM": "LlamaConfig", "Qwen2ForCausalLM": "Qwen2Config",
           "Qwen3ForCausalLM": "Qwen3Config",
           "Glm4vForConditionalGeneration": "Glm4vConfig"}[arch]
    return getattr(transformers, cls)(**raw)


# transformers has no ChatGLM-6B v1 or GLM-4V-9B class: tests/models/test_chatglm_v1.py and
# test_glm4v_9b.py count those presets
@pytest.mark.parametrize("name", [n for n in PRESETS if n not in ("chatglm-6b", "glm-4v-9b")])
def test_preset_parameter_count_equals_transformers(name: str) -> None:
    cfg = resolve_model_config(name)
    hf_cfg = _hf_config_for_preset(name)
    arch = "GlmForCausalLM" if cfg.architecture == "ChatGLMModel" else cfg.architecture
    with torch.device("meta"):
        hf_model = getattr(transformers, arch)(hf_cfg)
    assert cfg.num_params == sum(p.numel() for p in hf_model.parameters())
    assert cfg.load_format == "dummy" and cfg.tokenizer is None


def test_glm_4_9b_preset() -> None:
    cfg = resolve_model_config("glm-4-9b", device_type="cuda")
    assert cfg.architecture == "GlmForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (40, 4096, 2)
    assert cfg.rotary_dim == 64 and cfg.rope_interleaved and cfg.attention_bias
    assert cfg.eos_token_ids == GLM_STOPS
    assert cfg.dtype == "bfloat16" and cfg.max_model_len == 131072
    lines = "\n".join(model_info_lines(cfg))
    assert "parameters: 9.40 B" in lines
    assert "weights: 18.80 GB in bfloat16" in lines
    assert "KV cache: 40.0 KiB per token" in lines


def test_other_presets() -> None:
    glm4 = resolve_model_config("glm-4-9b-0414")
    assert glm4.sandwich_norm and glm4.eos_token_ids == GLM_STOPS and glm4.rotary_dim == 64
    chatglm = resolve_model_config("chatglm3-6b", device_type="cuda")
    assert chatglm.dtype == "float16" and chatglm.eos_token_ids == (2, 64795, 64797)
    assert chatglm.num_key_value_heads == 2 and chatglm.max_model_len == 8192
    llama31 = resolve_model_config("llama-3.1-8b")
    assert llama31.rope_scaling is not None and llama31.rope_scaling["rope_type"] == "llama3"
    qwen3 = resolve_model_config("qwen3-8b")
    assert qwen3.qk_norm and not qwen3.attention_bias
    qwen2 = resolve_model_config("qwen2.5-7b")
    assert qwen2.attention_bias and not qwen2.o_proj_bias
    assert qwen2.eos_token_ids == (151645, 151643)


@pytest.mark.parametrize(
    "arch,overrides",
    [(a, {}) for a in ARCHITECTURES]
    + [("LlamaForCausalLM", dict(attention_bias=True, tie_word_embeddings=True)),
       ("Qwen3ForCausalLM", dict(attention_bias=True)),
       ("Qwen2ForCausalLM", dict(tie_word_embeddings=True))],
)
def test_num_params_equals_built_model(arch: str, overrides: dict, tmp_path: Path) -> None:
    path = make_tiny_checkpoint(arch, tmp_path / "ckpt", **overrides)
    cfg = resolve_model_config(str(path))
    model = load_model(cfg, torch.device("cpu"))
    assert cfg.num_params == sum(p.numel() for p in model.parameters())


def test_dtype_resolution(tmp_path: Path) -> None:
    path = str(make_tiny_checkpoint("Qwen3ForCausalLM", tmp_path / "ckpt"))  # saved float32
    assert resolve_model_config(path).dtype == "float32"
    assert resolve_model_config(path, device_type="cuda").dtype == "bfloat16"
    assert resolve_model_config(path, dtype="bf16").dtype == "bfloat16"
    assert resolve_model_config(path, dtype="fp16").dtype == "float16"
    assert resolve_model_config("llama-3-8b", dtype="float32", device_type="cuda").dtype == (
        "float32")
    with pytest.raises(ValueError, match="dtype"):
        resolve_model_config(path, dtype="int8")


def test_max_model_len(tmp_path: Path) -> None:
    path = str(make_tiny_checkpoint("GlmForCausalLM", tmp_path / "ckpt"))
    assert resolve_model_config(path).max_model_len == 512
    assert resolve_model_config(path, max_model_len=100).max_model_len == 100
    with pytest.raises(ValueError, match="exceeds the model's context length 512"):
        resolve_model_config(path, max_model_len=513)
    chatglm = str(make_tiny_checkpoint("ChatGLMModel", tmp_path / "cg"))
    assert resolve_model_config(chatglm).max_model_len == 512  # from seq_length


def test_chatglm_config_normalised(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("ChatGLMModel", tmp_path / "ckpt", rope_ratio=500,
                                num_key_value_heads=1, head_dim=32, vocab_size=311)
    cfg = resolve_model_config(str(path))
    assert cfg.architecture == "ChatGLMModel"
    assert cfg.rope_theta == 5_000_000.0
    assert (cfg.num_key_value_heads, cfg.head_dim, cfg.rotary_dim) == (1, 32, 16)
    assert cfg.vocab_size == 311 and cfg.rope_interleaved


def test_generation_config_eos_union_and_sampling_defaults(tmp_path: Path) -> None:
    path = make_tiny_checkpoint(
        "LlamaForCausalLM", tmp_path / "ckpt", eos_token_id=2,
        generation_config={"eos_token_id": [7, 2], "do_sample": True, "temperature": 0.6,
                           "top_p": 0.9, "max_length": 4096},
    )
    cfg = resolve_model_config(str(path))
    assert cfg.eos_token_ids == (2, 7)
    assert cfg.generation_defaults == {"temperature": 0.6, "top_p": 0.9}
    greedy = make_tiny_checkpoint(
        "LlamaForCausalLM", tmp_path / "greedy",
        generation_config={"do_sample": False, "temperature": 0.6, "repetition_penalty": 1.1},
    )
    assert resolve_model_config(str(greedy)).generation_defaults == {"repetition_penalty": 1.1}


def test_tokenizer_defaults_to_folder_with_tokenizer_files(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("Qwen2ForCausalLM", tmp_path / "ckpt")
    assert resolve_model_config(str(path)).tokenizer is None
    (path / "tokenizer.json").write_text("{}")
    assert resolve_model_config(str(path)).tokenizer == str(path)
    assert resolve_model_config(str(path), tokenizer="/elsewhere").tokenizer == "/elsewhere"


def _write_config(tmp_path: Path, raw: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(raw))
    return str(tmp_path)


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {"architectures": ["MistralForCausalLM"]})
    with pytest.raises(ValueError, match="MistralForCausalLM") as e:
        resolve_model_config(path)
    assert all(a in str(e.value) for a in SUPPORTED_ARCHITECTURES)


def test_unsupported_variants_fail_clearly(tmp_path: Path) -> None:
    base = dict(PRESETS["llama-3-8b"].config)
    with pytest.raises(ValueError, match="unsupported rope scaling type 'yarn'"):
        resolve_model_config(_write_config(
            tmp_path, {**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    v1 = {**PRESETS["chatglm-6b"].config, "position_encoding_2d": False}
    with pytest.raises(ValueError, match="ChatGLM-6B v1 without position_encoding_2d"):
        resolve_model_config(_write_config(tmp_path, v1))
    v1 = {k: v for k, v in PRESETS["chatglm-6b"].config.items() if k != "bos_token_id"}
    with pytest.raises(ValueError, match="bos_token_id"):
        resolve_model_config(_write_config(tmp_path, v1))
    for key, value in (("pre_seq_len", 128), ("quantization_bit", 4)):
        v1 = {**PRESETS["chatglm-6b"].config, key: value}
        with pytest.raises(ValueError, match=key):
            resolve_model_config(_write_config(tmp_path, v1))
    qwen = {**PRESETS["qwen2.5-7b"].config, "use_sliding_window": True, "sliding_window": 4096,
            "max_window_layers": 4}
    with pytest.raises(ValueError, match="sliding-window"):
        resolve_model_config(_write_config(tmp_path, qwen))


def test_unknown_model_and_preset_misuse(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neither a checkpoint folder nor a preset.*glm-4-9b"):
        resolve_model_config("no-such-model")
    with pytest.raises(ValueError, match="load_format='dummy'"):
        resolve_model_config("glm-4-9b", load_format="safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model_config(str(tmp_path))
