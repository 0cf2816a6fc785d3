"""Tiny random-weight checkpoints of real architectures, saved the way real ones are.

    path = make_tiny_checkpoint("GlmForCausalLM", tmp_path / "glm", num_key_value_heads=1)
    ref = load_hf_reference(path)  # transformers' model of the same weights: the oracle

Weights are drawn so that every part of the model matters to the logits (norm weights away
from 1, non-zero biases, projections that keep activations near unit scale, attention scores
large enough for positions to change them), which lets comparisons against transformers fail on
any real difference. "ChatGLMModel" is written in the remote-code layout (fused query_key_value,
transformer.* names, ChatGLM config keys); its oracle is transformers' GlmForCausalLM with the
weights renamed back and rope_theta = 10000 * rope_ratio.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

ARCHITECTURES = (
    "GlmForCausalLM",
    "Glm4ForCausalLM",
    "ChatGLMModel",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
_CONFIG_CLASSES = {
    "GlmForCausalLM": "GlmConfig",
    "Glm4ForCausalLM": "Glm4Config",
    "ChatGLMModel": "GlmConfig",
    "LlamaForCausalLM": "LlamaConfig",
    "Qwen2ForCausalLM": "Qwen2Config",
    "Qwen3ForCausalLM": "Qwen3Config",
}
TINY_CONFIG: dict[str, Any] = {
    "vocab_size": 301,  # odd on purpose
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": [2, 3],
}
DEFAULT_ROPE_RATIO = 3.0  # ChatGLM: base 30000, so a checkpoint ignoring rope_ratio fails
_SHARD_SIZE = "100KB"  # several shards even for the tiny default config


def make_tiny_checkpoint(
    arch: str,
    path: Path,
    *,
    seed: int = 0,
    sharded: bool = False,
    old_config_layout: bool = False,
    generation_config: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> Path:
    """Write config.json, generation_config.json and float32 safetensors of a tiny `arch` model.

    config_overrides are transformers config keywords (head_dim=80, num_attention_heads=6,
    tie_word_embeddings=True, rope_theta=..., rope_scaling={...}, ...); for "ChatGLMModel" also
    rope_ratio. sharded: several files plus model.safetensors.index.json. old_config_layout:
    transformers-4 style config (top-level rope_theta / partial_rotary_factor / rope_scaling,
    torch_dtype). generation_config: extra keys merged into generation_config.json.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    overrides = dict(config_overrides)
    rope_ratio = float(overrides.pop("rope_ratio", DEFAULT_ROPE_RATIO))
    kwargs = {**TINY_CONFIG, **overrides}
    if arch == "Qwen2ForCausalLM":  # Qwen2 derives head_dim from hidden_size / heads
        kwargs.pop("head_dim", None)
    if arch == "ChatGLMModel":
        if kwargs.get("tie_word_embeddings"):
            raise ValueError("ChatGLM checkpoints do not tie embeddings")
        kwargs["rope_theta"] = 10000.0 * rope_ratio
    hf_cfg = getattr(transformers, _CONFIG_CLASSES[arch])(**kwargs)
    model_arch = "GlmForCausalLM" if arch == "ChatGLMModel" else arch
    torch.manual_seed(seed)
    model = getattr(transformers, model_arch)(hf_cfg).eval()
    _randomize(model, seed)

    if arch == "ChatGLMModel":
        _write_chatglm(model, path, rope_ratio, sharded)
    else:
        model.save_pretrained(path, max_shard_size=_SHARD_SIZE if sharded else "10GB")
        if old_config_layout:
            _rewrite_old_layout(path / "config.json", arch)
    gen = {"eos_token_id": kwargs["eos_token_id"], "pad_token_id": kwargs["pad_token_id"]}
    gen.update(generation_config or {})
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path


def load_hf_reference(path: Path) -> transformers.PreTrainedModel:
    """transformers' float32 model for a checkpoint written by make_tiny_checkpoint (eval mode)."""
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    if raw.get("model_type") != "chatglm":
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, attn_implementation="eager"
        )
        return model.eval()
    cfg = transformers.GlmConfig(
        vocab_size=raw["padded_vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["ffn_hidden_size"],
        num_hidden_layers=raw["num_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw["multi_query_group_num"],
        head_dim=raw["kv_channels"],
        max_position_embeddings=raw["seq_length"],
        rms_norm_eps=raw["layernorm_epsilon"],
        rope_theta=10000.0 * raw.get("rope_ratio", 1),
        attention_bias=raw["add_qkv_bias"],
        pad_token_id=raw["pad_token_id"],
        eos_token_id=raw["eos_token_id"],
    )
    cfg._attn_implementation = "eager"
    model = transformers.GlmForCausalLM(cfg)
    model.load_state_dict(_from_chatglm(_read_state_dict(path), cfg), strict=True)
    return model.eval()


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if p.dim() == 1 and "norm" in name:
            p.copy_(1.0 + 0.2 * noise)
        elif p.dim() == 1:  # biases
            p.copy_(0.2 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        else:  # keeps each projection's output near the scale of its input
            p.copy_(noise / p.shape[1] ** 0.5)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def _to_chatglm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    layer_names = {
        "input_layernorm": "input_layernorm",
        "post_attention_layernorm": "post_attention_layernorm",
        "self_attn.o_proj": "self_attention.dense",
        "mlp.gate_up_proj": "mlp.dense_h_to_4h",
        "mlp.down_proj": "mlp.dense_4h_to_h",
    }
    for name, t in state.items():
        if name == "model.embed_tokens.weight":
            out["transformer.embedding.word_embeddings.weight"] = t
        elif name == "model.norm.weight":
            out["transformer.encoder.final_layernorm.weight"] = t
        elif name == "lm_head.weight":
            out["transformer.output_layer.weight"] = t
        else:
            _, _, i, rest = name.split(".", 3)
            prefix = f"transformer.encoder.layers.{i}"
            module, leaf = rest.rsplit(".", 1)
            if module == "self_attn.q_proj":  # q|k|v stacked into one tensor
                parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
                out[f"{prefix}.self_attention.query_key_value.{leaf}"] = torch.cat(parts)
            elif module not in ("self_attn.k_proj", "self_attn.v_proj"):
                out[f"{prefix}.{layer_names[module]}.{leaf}"] = t
    return out


def _from_chatglm(
    state: dict[str, torch.Tensor], cfg: transformers.GlmConfig
) -> dict[str, torch.Tensor]:
    q = cfg.num_attention_heads * cfg.head_dim
    kv = cfg.num_key_value_heads * cfg.head_dim
    back = {
        "input_layernorm": "input_layernorm",
        "post_attention_layernorm": "post_attention_layernorm",
        "self_attention.dense": "self_attn.o_proj",
        "mlp.dense_h_to_4h": "mlp.gate_up_proj",
        "mlp.dense_4h_to_h": "mlp.down_proj",
    }
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if name == "transformer.embedding.word_embeddings.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "transformer.encoder.final_layernorm.weight":
            out["model.norm.weight"] = t
        elif name == "transformer.output_layer.weight":
            out["lm_head.weight"] = t
        elif name.startswith("transformer.encoder.layers."):
            _, _, _, i, rest = name.split(".", 4)
            module, leaf = rest.rsplit(".", 1)
            prefix = f"model.layers.{i}"
            if module == "self_attention.query_key_value":
                for proj, part in zip(("q", "k", "v"), t.split([q, kv, kv]), strict=True):
                    out[f"{prefix}.self_attn.{proj}_proj.{leaf}"] = part
            else:
                out[f"{prefix}.{back[module]}.{leaf}"] = t
    return out


def _write_chatglm(
    model: transformers.GlmForCausalLM, path: Path, rope_ratio: float, sharded: bool
) -> None:
    c = model.config
    state = _to_chatglm({k: v.contiguous() for k, v in model.state_dict().items()})
    rotary_dim = c.head_dim // 2
    # the remote-code model saves its rotary buffer: the loader must drop it
    state["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (
        10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    )
    _save_state(state, path, sharded)
    config = {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "num_layers": c.num_hidden_layers,
        "padded_vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size,
        "kv_channels": c.head_dim,
        "num_attention_heads": c.num_attention_heads,
        "multi_query_attention": True,
        "multi_query_group_num": c.num_key_value_heads,
        "seq_length": c.max_position_embeddings,
        "layernorm_epsilon": c.rms_norm_eps,
        "rmsnorm": True,
        "post_layer_norm": True,
        "add_bias_linear": False,
        "add_qkv_bias": c.attention_bias,
        "apply_residual_connection_post_layernorm": False,
        "original_rope": True,
        "rope_ratio": rope_ratio,
        "tie_word_embeddings": False,
        "eos_token_id": c.eos_token_id,
        "pad_token_id": c.pad_token_id,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))


def _save_state(state: dict[str, torch.Tensor], path: Path, sharded: bool) -> None:
    if not sharded:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        return
    names = sorted(state)
    chunks = [names[i : i + 6] for i in range(0, len(names), 6)]
    weight_map: dict[str, str] = {}
    for k, chunk in enumerate(chunks):
        file = f"model-{k + 1:05d}-of-{len(chunks):05d}.safetensors"
        save_file({n: state[n] for n in chunk}, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    index = {"metadata": {"total_size": sum(t.numel() * 4 for t in state.values())},
             "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _rewrite_old_layout(config_path: Path, arch: str) -> None:
    """transformers-4 layout: rope settings at top level, legacy rope_scaling, torch_dtype."""
    raw = json.loads(config_path.read_text())
    rope = dict(raw.pop("rope_parameters", None) or {})
    raw["rope_theta"] = rope.pop("rope_theta", 10000.0)
    partial = rope.pop("partial_rotary_factor", None)
    # glm-4-9b-chat-hf omits the key (default 0.5); GLM-4-0414 configs spell it out
    if partial is not None and not (arch == "GlmForCausalLM" and partial == 0.5):
        raw["partial_rotary_factor"] = partial
    rope_type = rope.pop("rope_type", "default")
    if rope_type != "default":
        raw["rope_scaling"] = {"type": rope_type, **rope}
    raw["torch_dtype"] = raw.pop("dtype", "float32")
    config_path.write_text(json.dumps(raw, indent=2))


GLM4V_TOKENS = {  # inside the tiny vocab
    "image_token_id": 300, "video_token_id": 299, "image_start_token_id": 296,
    "image_end_token_id": 297, "video_start_token_id": 298, "video_end_token_id": 295,
}


def make_tiny_glm4v_checkpoint(path: Path, *, seed: int = 0) -> Path:
    """A tiny random Glm4vForConditionalGeneration saved by transformers (float32): text stack
    hidden 64 / 4 heads of 16 (rotary 8, mrope_section [2, 1, 1]), tower depth 2 / hidden 32 /
    2 heads, a 4x4 position table (image_size 56), image tokens at ids 296-300 of vocab 301."""
    path = Path(path)
    cfg = transformers.Glm4vConfig(
        text_config={
            "vocab_size": 301, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "attention_bias": True,
            "pad_token_id": 0, "eos_token_id": [2, 3],
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1],
                                "partial_rotary_factor": 0.5, "rope_theta": 10000.0},
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "num_heads": 2, "out_hidden_size": 64,
            "intermediate_size": 96, "image_size": 56, "patch_size": 14, "rms_norm_eps": 1e-6,
        },
        **GLM4V_TOKENS,
    )
    torch.manual_seed(seed)
    model = transformers.Glm4vForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    gen = {"eos_token_id": [2, 3], "pad_token_id": 0}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path
