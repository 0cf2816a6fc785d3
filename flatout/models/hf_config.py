"""Normalises a checkpoint's config.json (any of the layouts in the wild) into ModelConfig fields.

Layouts handled:
- transformers 5: rotary settings in `rope_parameters` {rope_type, rope_theta,
  partial_rotary_factor, scaling keys...}
- transformers 4: top-level `rope_theta`, `partial_rotary_factor`, and `rope_scaling`
  {type | rope_type, scaling keys...}
- ChatGLM-6B v1 (`position_encoding_2d`): num_layers, inner_hidden_size, max_sequence_length,
  bos (<sop>) / mask / gmask token ids; LayerNorm, GELU, 2-D rotary, prefix-LM attention.
- remote-code ChatGLM (`model_type: chatglm`): num_layers, ffn_hidden_size, kv_channels,
  multi_query_group_num, padded_vocab_size, seq_length, layernorm_epsilon, rope_ratio
  (base 10000 * rope_ratio), rotary on half of each head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flatout.config import EvaVisionConfig, VisionConfig
from flatout.layers.rotary import check_rope_scaling

GLM_ARCHITECTURES = ("GlmForCausalLM", "Glm4ForCausalLM")
CHATGLM_ARCHITECTURES = ("ChatGLMModel", "ChatGLMForConditionalGeneration")
LLAMA_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
VISION_ARCHITECTURES = ("Glm4vForConditionalGeneration",)
SUPPORTED_ARCHITECTURES = (
    GLM_ARCHITECTURES + CHATGLM_ARCHITECTURES + LLAMA_ARCHITECTURES + VISION_ARCHITECTURES
)

_BY_MODEL_TYPE = {
    "glm": "GlmForCausalLM",
    "glm4": "Glm4ForCausalLM",
    "chatglm": "ChatGLMModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "glm4v": "Glm4vForConditionalGeneration",
}
_ROPE_KEYS_NOT_SCALING = ("rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class ParsedConfig:
    fields: dict[str, Any]  # ModelConfig fields the config determines
    max_position_embeddings: int
    checkpoint_dtype: str | None  # torch_dtype / dtype as saved, e.g. "bfloat16"


def eos_list(value: Any) -> list[int]:
    """eos_token_id as configs store it: int, list of ints, or null."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def architecture_of(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    for arch in archs:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    if not archs and raw.get("model_type") in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[raw["model_type"]]
    found = archs or raw.get("model_type")
    raise ValueError(
        f"unsupported architecture {found!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def _require(raw: dict[str, Any], key: str) -> Any:
    if raw.get(key) is None:
        raise ValueError(f"config.json lacks {key!r}")
    return raw[key]


def _unsupported(arch: str, what: str) -> ValueError:
    return ValueError(f"{arch}: {what} is not supported")


def parse_hf_config(raw: dict[str, Any]) -> ParsedConfig:
    arch = architecture_of(raw)
    if arch in CHATGLM_ARCHITECTURES:
        fields, max_pos = _chatglm_fields(arch, raw)
    elif arch in VISION_ARCHITECTURES:
        fields, max_pos = _glm4v_fields(arch, raw)
        top = {k: v for k, v in raw.items() if v is not None}
        raw = {**raw["text_config"], **top, "eos_token_id": _glm4v_eos(raw)}
    else:
        fields, max_pos = _hf_fields(arch, raw)
    if fields.get("hidden_act", "silu") == "silu" and raw.get("hidden_act", "silu") != "silu":
        raise _unsupported(arch, f"hidden_act {raw['hidden_act']!r} (only silu)")
    if fields["num_attention_heads"] % fields["num_key_value_heads"]:
        raise ValueError(
            f"num_attention_heads {fields['num_attention_heads']} is not a multiple of "
            f"num_key_value_heads {fields['num_key_value_heads']}"
        )
    fields.update(
        architecture=arch,
        eos_token_ids=tuple(eos_list(raw.get("eos_token_id"))),
        bos_token_id=raw.get("bos_token_id"),
        pad_token_id=raw.get("pad_token_id"),
        hidden_act=fields.get("hidden_act", "silu"),
    )
    dtype = raw.get("dtype") or raw.get("torch_dtype")
    return ParsedConfig(fields, int(max_pos), str(dtype) if dtype else None)


def _rope(raw: dict[str, Any]) -> tuple[float, float | None, dict[str, Any] | None]:
    """(rope_theta, partial_rotary_factor or None, scaling dict or None) from either layout."""
    params = dict(raw.get("rope_parameters") or {})
    legacy = dict(raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", legacy.get("rope_theta", raw.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
    scaling = {k: v for k, v in (params or legacy).items() if k not in _ROPE_KEYS_NOT_SCALING}
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type == "default":
        return float(theta), partial, None
    scaling["rope_type"] = rope_type
    if rope_type == "llama3":
        scaling.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    check_rope_scaling(scaling)
    return float(theta), partial, scaling


def _hf_fields(arch: str, raw: dict[str, Any]) -> tuple[dict[str, Any], int]:
    hidden = int(_require(raw, "hidden_size"))
    heads = int(_require(raw, "num_attention_heads"))
    head_dim = int(raw.get("head_dim") or hidden // heads)
    theta, partial, scaling = _rope(raw)
    is_glm = arch in GLM_ARCHITECTURES
    if partial is None:
        partial = 0.5 if is_glm else 1.0  # transformers' GlmConfig/Glm4Config default
    if arch == "Qwen2ForCausalLM":  # q/k/v always carry a bias, o_proj never
        attention_bias, o_proj_bias = True, False
    elif is_glm:  # o_proj never has a bias
        attention_bias, o_proj_bias = bool(raw.get("attention_bias", True)), False
    else:  # Llama, Qwen3: attention_bias covers o_proj too
        attention_bias = o_proj_bias = bool(raw.get("attention_bias", False))
    if raw.get("mlp_bias"):
        raise _unsupported(arch, "mlp_bias")
    if "sliding_attention" in (raw.get("layer_types") or []) or (
        raw.get("use_sliding_window")
        and raw.get("sliding_window")
        and raw.get("max_window_layers", 0) < raw["num_hidden_layers"]
    ):
        raise _unsupported(arch, "sliding-window attention")
    fields = dict(
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=hidden,
        num_hidden_layers=int(_require(raw, "num_hidden_layers")),
        num_attention_heads=heads,
        num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate_size=int(_require(raw, "intermediate_size")),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1.5625e-07 if is_glm else 1e-6)),
        rope_theta=theta,
        rotary_dim=int(head_dim * partial),
        rope_interleaved=is_glm,
        rope_scaling=scaling,
        attention_bias=attention_bias,
        o_proj_bias=o_proj_bias,
        qk_norm=arch == "Qwen3ForCausalLM",
        sandwich_norm=arch == "Glm4ForCausalLM",
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    return fields, int(_require(raw, "max_position_embeddings"))


def _chatglm_fields(arch: str, raw: dict[str, Any]) -> tuple[dict[str, Any], int]:
    if raw.get("position_encoding_2d") or "inner_hidden_size" in raw:
        return _chatglm_v1_fields(arch, raw)
    for key, bad, what in [
        ("rmsnorm", False, "LayerNorm (rmsnorm: false)"),
        ("post_layer_norm", False, "no final norm (post_layer_norm: false)"),
        ("add_bias_linear", True, "biases on dense/MLP (add_bias_linear: true)"),
        ("apply_residual_connection_post_layernorm", True, "post-norm residuals"),
    ]:
        if raw.get(key, not bad) == bad:
            raise _unsupported(arch, what)
    hidden = int(_require(raw, "hidden_size"))
    heads = int(_require(raw, "num_attention_heads"))
    head_dim = int(raw.get("kv_channels") or hidden // heads)
    kv_heads = int(raw["multi_query_group_num"]) if raw.get("multi_query_attention") else heads
    fields: dict[str, Any] = dict(
        vocab_size=int(raw.get("padded_vocab_size") or _require(raw, "vocab_size")),
        hidden_size=hidden,
        num_hidden_layers=int(_require(raw, "num_layers")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=int(_require(raw, "ffn_hidden_size")),
        rms_norm_eps=float(raw.get("layernorm_epsilon", 1e-5)),
        rope_theta=10000.0 * float(raw.get("rope_ratio", 1)),
        rotary_dim=head_dim // 2,
        # remote code always pairs interleaved; vLLM reads original_rope: false as half-split
        rope_interleaved=bool(raw.get("original_rope", True)),
        rope_scaling=None,
        attention_bias=bool(raw.get("add_qkv_bias", False)),
        o_proj_bias=False,
        qk_norm=False,
        sandwich_norm=False,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )
    vis = raw.get("vision_config")
    if vis is not None:  # GLM-4V-9B: the glm-4-9b-chat text stack plus an EVA2-CLIP tower
        fields["eva_vision"] = _eva_vision(arch, raw, vis, fields)
    return fields, int(_require(raw, "seq_length"))


def _first(value: Any, default: int) -> Any:
    return default if value is None else value


def _eva_vision(arch: str, raw: dict[str, Any], vis: Any, text: dict[str, Any]) -> EvaVisionConfig:
    if not isinstance(vis, dict):
        raise ValueError(f"{arch}: vision_config must be an object")
    if vis.get("hidden_act", "gelu") != "gelu":
        raise _unsupported(arch, f"vision hidden_act {vis['hidden_act']!r} (only gelu)")
    eva = EvaVisionConfig(
        depth=int(_require(vis, "num_hidden_layers")),
        hidden_size=int(_require(vis, "hidden_size")),
        num_heads=int(_require(vis, "num_heads")),
        intermediate_size=int(_require(vis, "intermediate_size")),
        out_hidden_size=text["hidden_size"],
        glu_intermediate_size=text["intermediate_size"],
        image_size=int(vis.get("image_size", 1120)),
        patch_size=int(vis.get("patch_size", 14)),
        in_channels=int(vis.get("in_channels", 3)),
        layer_norm_eps=float(vis.get("layer_norm_eps", 1e-6)),
        scaling_factor=float(vis.get("scaling_factor", 8.0)),
        boi_token_id=int(raw.get("boi_token_id", 151339)),
        eoi_token_id=int(raw.get("eoi_token_id", 151340)),
        placeholder_token_id=int(_first(raw.get("pad_token_id"), 151329)),
    )
    if eva.grid % 2 or eva.hidden_size % eva.num_heads:
        raise ValueError(f"{arch}: vision grid {eva.grid} must be even and hidden_size "
                         f"{eva.hidden_size} a multiple of num_heads {eva.num_heads}")
    positions = vis.get("num_positions")
    if positions is not None and int(positions) != eva.grid**2 + 1:
        raise ValueError(f"{arch}: vision num_positions {positions} != (image_size / patch_size)"
                         f"^2 + 1 = {eva.grid**2 + 1}")
    return eva


def _chatglm_v1_fields(arch: str, raw: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """ChatGLM-6B v1 (THUDM/chatglm-6b): GLM-130B-style blocks, 2-D rotary, prefix-LM."""
    if not raw.get("position_encoding_2d", False):
        raise _unsupported(arch, "ChatGLM-6B v1 without position_encoding_2d")
    hidden = int(_require(raw, "hidden_size"))
    heads = int(_require(raw, "num_attention_heads"))
    if hidden % (2 * heads):
        raise ValueError(f"hidden_size {hidden} is not a multiple of 2 x {heads} heads")
    head_dim = hidden // heads
    if head_dim % 4:
        raise ValueError(f"head_dim {head_dim} must split into two even rotary halves")
    if raw.get("pre_seq_len"):
        raise _unsupported(arch, f"P-tuning prefixes (pre_seq_len {raw['pre_seq_len']})")
    if raw.get("quantization_bit"):
        raise _unsupported(arch, f"quantization_bit {raw['quantization_bit']} checkpoints")
    _require(raw, "bos_token_id")  # <sop>: where the bidirectional prompt ends
    gmask, mask = int(raw.get("gmask_token_id", 130001)), int(raw.get("mask_token_id", 130000))
    fields = dict(
        vocab_size=int(_require(raw, "vocab_size")),
        hidden_size=hidden,
        num_hidden_layers=int(_require(raw, "num_layers")),
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=head_dim,
        intermediate_size=int(raw.get("inner_hidden_size") or 4 * hidden),
        rms_norm_eps=float(raw.get("layernorm_epsilon", 1e-5)),  # LayerNorm's eps here
        rope_theta=10000.0,  # hard-coded in the checkpoint's code
        rotary_dim=head_dim // 2,  # each half of a head is rotated by one of the 2-D positions
        rope_interleaved=False,  # NeoX halves within each half of the head
        rope_scaling=None,
        attention_bias=True,
        o_proj_bias=True,
        tie_word_embeddings=False,
        hidden_act="gelu_tanh",
        position_encoding_2d=True,
        prefix_lm=True,
        mask_token_ids=(gmask, mask),
    )
    return fields, int(raw.get("max_sequence_length") or 2048)


def _glm4v_eos(raw: dict[str, Any]) -> Any:
    text = raw["text_config"]
    return text.get("eos_token_id", raw.get("eos_token_id"))


def _glm4v_fields(arch: str, raw: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """GLM-4.1V: a GLM-4-0414 text decoder (under text_config) with M-RoPE, plus the tower."""
    text = raw.get("text_config")
    vis = raw.get("vision_config")
    if not isinstance(text, dict) or not isinstance(vis, dict):
        raise ValueError(f"{arch}: config.json lacks text_config / vision_config")
    # transformers' Glm4vTextAttention derives head_dim from hidden_size / heads
    text = {k: v for k, v in text.items() if k != "head_dim"}
    text.setdefault("tie_word_embeddings", raw.get("tie_word_embeddings", False))
    fields, max_pos = _hf_fields("Glm4ForCausalLM", text)
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    section = tuple(int(s) for s in rope.get("mrope_section") or (8, 12, 12))
    if 2 * sum(section) != fields["rotary_dim"]:
        raise ValueError(
            f"{arch}: mrope_section {list(section)} does not cover rotary_dim "
            f"{fields['rotary_dim']} (2 x sum must equal it)"
        )
    if vis.get("hidden_act", "silu") != "silu":
        raise _unsupported(arch, f"vision hidden_act {vis['hidden_act']!r} (only silu)")
    vrope = vis.get("rope_parameters") or {}
    vision = VisionConfig(
        depth=int(_require(vis, "depth")),
        hidden_size=int(_require(vis, "hidden_size")),
        num_heads=int(_require(vis, "num_heads")),
        intermediate_size=int(_require(vis, "intermediate_size")),
        out_hidden_size=int(_require(vis, "out_hidden_size")),
        patch_size=int(vis.get("patch_size", 14)),
        temporal_patch_size=int(vis.get("temporal_patch_size", 2)),
        spatial_merge_size=int(vis.get("spatial_merge_size", 2)),
        image_size=int(vis.get("image_size", 336)),
        in_channels=int(vis.get("in_channels", 3)),
        rms_norm_eps=float(vis.get("rms_norm_eps", 1e-5)),
        attention_bias=bool(vis.get("attention_bias", False)),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
        image_token_id=int(raw.get("image_token_id", 151343)),
        image_start_token_id=int(raw.get("image_start_token_id", 151339)),
        image_end_token_id=int(raw.get("image_end_token_id", 151340)),
    )
    if vision.out_hidden_size != fields["hidden_size"]:
        raise ValueError(
            f"{arch}: vision out_hidden_size {vision.out_hidden_size} != text hidden_size "
            f"{fields['hidden_size']}"
        )
    fields.update(mrope_section=section, vision=vision)
    return fields, max_pos
