"""Model resolution and loading: checkpoint folder or preset -> ModelConfig -> loaded model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from flatout.config import QUANTIZATION_METHODS, EngineArgs, ModelConfig, normalize_kv_cache_dtype
from flatout.layers.quantization import check_device, int4_format
from flatout.models.chatglm_v1 import ChatGLMv1ForCausalLM
from flatout.models.decoder import CausalLM
from flatout.models.glm4v import Glm4vForConditionalGeneration
from flatout.models.glm4v_9b import ChatGLM4VForCausalLM
from flatout.models.hf_config import (
    CHATGLM_ARCHITECTURES,
    VISION_ARCHITECTURES,
    eos_list,
    parse_hf_config,
)
from flatout.models.loader import init_dummy_weights, load_safetensors_weights
from flatout.models.prequantized import parse_checkpoint_quantization
from flatout.models.presets import PRESETS
from flatout.models.weight_names import (
    CHATGLM_V1_WEIGHT_NAMES,
    CHATGLM_WEIGHT_NAMES,
    GLM4V_9B_WEIGHT_NAMES,
    GLM4V_WEIGHT_NAMES,
    HF_WEIGHT_NAMES,
    WeightNameMap,
)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "float": "float32"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")
# generation_config.json keys that become per-request sampling defaults
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
_GREEDY_IGNORED = ("temperature", "top_p", "top_k", "min_p")


def weight_names_for(
    architecture: str, position_encoding_2d: bool = False, eva_vision: bool = False
) -> WeightNameMap:
    if position_encoding_2d:  # ChatGLM-6B v1: the model's names are the checkpoint's
        return CHATGLM_V1_WEIGHT_NAMES
    if eva_vision:  # GLM-4V-9B
        return GLM4V_9B_WEIGHT_NAMES
    if architecture in VISION_ARCHITECTURES:
        return GLM4V_WEIGHT_NAMES
    return CHATGLM_WEIGHT_NAMES if architecture in CHATGLM_ARCHITECTURES else HF_WEIGHT_NAMES


def resolve_model(args: EngineArgs, device_type: str) -> ModelConfig:
    """The model config of the engine arguments' model (the demo model when none is named)."""
    model = args.model
    if model is None:
        from flatout.demo import demo_model_path

        model = demo_model_path()
    return resolve_model_config(
        model,
        dtype=args.dtype,
        device_type=device_type,
        max_model_len=args.max_model_len,
        load_format=args.load_format,
        tokenizer=args.tokenizer,
        quantization=args.quantization,
        quantize_lm_head=args.quantize_lm_head,
    )


def resolve_model_config(
    model: str,
    *,
    dtype: str = "auto",
    device_type: str = "cpu",
    max_model_len: int | None = None,
    load_format: str = "auto",
    tokenizer: str | None = None,
    quantization: str | None = None,
    quantize_lm_head: bool = False,
) -> ModelConfig:
    """Resolve a checkpoint folder or preset name into a ModelConfig.

    dtype "auto": float32 on CPU; on a GPU the checkpoint's bf16/fp16 dtype, else bfloat16 (fp16
    on GPUs without bf16). max_model_len defaults to the model's context length and may not
    exceed it. quantization (int8 | fp8) quantizes the decoder's linears on load (see
    `resolve_quantization`). Sampling defaults come from generation_config.json:
    temperature/top_p/top_k/min_p only when it does not say do_sample: false (then they describe
    a sampler the authors switched off), repetition_penalty always. EOS ids are config.json's
    followed by generation_config's.
    """
    if model == "demo-vl":  # the built-in vision demo, made on first use
        from flatout.demo_vl import demo_vl_model_path

        model = demo_vl_model_path()
    folder = Path(model)
    if folder.is_dir():
        raw = _read_json(folder / "config.json", required=True)
        generation = _read_json(folder / "generation_config.json", required=False)
        if tokenizer is None and any((folder / f).is_file() for f in TOKENIZER_FILES):
            tokenizer = str(folder)
    elif model in PRESETS:
        if load_format not in ("auto", "dummy"):
            raise ValueError(
                f"preset {model!r} has no weight files: use load_format='dummy' (got "
                f"{load_format!r})"
            )
        load_format = "dummy"
        preset = PRESETS[model]
        raw, generation = dict(preset.config), {"eos_token_id": preset.generation_eos}
    else:
        raise ValueError(
            f"model {model!r} is neither a checkpoint folder nor a preset "
            f"(presets: {', '.join(PRESETS)})"
        )
    parsed = parse_hf_config(raw)
    fields = parsed.fields
    if max_model_len is None:
        max_model_len = parsed.max_position_embeddings
    elif max_model_len > parsed.max_position_embeddings:
        raise ValueError(
            f"max_model_len {max_model_len} exceeds the model's context length "
            f"{parsed.max_position_embeddings}"
        )
    elif max_model_len < 1:
        raise ValueError(f"max_model_len must be >= 1 (got {max_model_len})")
    quantization = resolve_quantization(
        quantization, quantize_lm_head, raw, bool(fields["tie_word_embeddings"])
    )
    if quantization and fields.get("position_encoding_2d") and raw.get("quantization_config"):
        # quantized on load, the rows are regrouped before they are quantized; a pre-quantized
        # checkpoint's scales would need the same regrouping, which nothing checks
        raise ValueError("quantization: pre-quantized ChatGLM-6B v1 checkpoints are not "
                         "supported; serve the fp16 checkpoint with --quantization int8")
    eos = list(fields.pop("eos_token_ids"))
    eos += [i for i in eos_list(generation.get("eos_token_id")) if i not in eos]
    return ModelConfig(
        model=model,
        **fields,
        max_model_len=max_model_len,
        dtype=_resolve_dtype(dtype, device_type, parsed.checkpoint_dtype),
        eos_token_ids=tuple(eos),
        generation_defaults=_sampling_defaults(generation),
        tokenizer=tokenizer,
        load_format=load_format,
        hf_config=raw,
        quantization=quantization,
        quantize_lm_head=quantize_lm_head,
    )


def resolve_quantization(
    method: str | None, quantize_lm_head: bool, raw: dict[str, Any], tied_embeddings: bool
) -> str | None:
    """The weight quantization to serve with, checked before anything is loaded: the one asked
    for, or the checkpoint's own (its quantization_config) when it ships quantized."""
    if method is not None and method not in QUANTIZATION_METHODS and not int4_format(method):
        raise ValueError(
            f"quantization: unknown method {method!r} (choose from "
            f"{', '.join(QUANTIZATION_METHODS)})"
        )
    checkpoint = parse_checkpoint_quantization(raw)
    if checkpoint is not None:
        method = checkpoint.served_method(method)
        if quantize_lm_head:
            raise ValueError("quantize_lm_head: not with a pre-quantized checkpoint (its LM "
                             "head is stored unquantized)")
    if quantize_lm_head and method is None:
        raise ValueError("quantize_lm_head: needs --quantization int8 or fp8")
    if quantize_lm_head and method is not None and method.startswith("w4a16"):
        raise ValueError(f"quantize_lm_head: the LM head cannot be held in 4 bits ({method}); "
                         "drop --quantize-lm-head or use --quantization int8 or fp8")
    if quantize_lm_head and tied_embeddings:
        raise ValueError(
            "quantize_lm_head: the LM head is tied to the embedding table here, which stays "
            "in the model dtype; drop --quantize-lm-head"
        )
    return method


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} not found: not a Hugging Face checkpoint folder")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _resolve_dtype(dtype: str, device_type: str, checkpoint_dtype: str | None) -> str:
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name in TORCH_DTYPES:
        return name
    if name != "auto":
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16 (got {dtype!r})")
    if device_type == "cpu":
        return "float32"
    if checkpoint_dtype in ("bfloat16", "float16"):
        name = checkpoint_dtype
    else:
        name = "bfloat16"
    if (
        name == "bfloat16"
        and device_type == "cuda"
        and torch.cuda.is_available()
        and not torch.cuda.is_bf16_supported()
    ):
        name = "float16"
    return name


def _sampling_defaults(generation: dict[str, Any]) -> dict[str, Any]:
    keys: tuple[str, ...] = SAMPLING_KEYS
    if generation.get("do_sample") is False:
        keys = tuple(k for k in keys if k not in _GREEDY_IGNORED)
    return {k: generation[k] for k in keys if generation.get(k) is not None}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    # parameters are created in the target dtype directly: no full-precision copy is ever made
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


Model = (CausalLM | Glm4vForConditionalGeneration | ChatGLMv1ForCausalLM
         | ChatGLM4VForCausalLM)


def load_model(cfg: ModelConfig, device: torch.device) -> Model:
    """Build the model for `cfg` on `device` in cfg.dtype and fill its weights (eval mode)."""
    model: Model
    check_device(cfg.quantization, device)
    with _default_dtype(TORCH_DTYPES[cfg.dtype]), torch.device(device):
        if cfg.position_encoding_2d:
            model = ChatGLMv1ForCausalLM(cfg)
        elif cfg.eva_vision is not None:
            model = ChatGLM4VForCausalLM(cfg)
        elif cfg.architecture in VISION_ARCHITECTURES:
            model = Glm4vForConditionalGeneration(cfg)
        else:
            model = CausalLM(cfg)
    if cfg.load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_safetensors_weights(
            model, cfg.model,
            weight_names_for(cfg.architecture, cfg.position_encoding_2d,
                             cfg.eva_vision is not None),
            cfg.tie_word_embeddings, parse_checkpoint_quantization(cfg.hf_config),
        )
    model.eval()
    return model


def model_info_lines(cfg: ModelConfig, kv_cache_dtype: str = "auto") -> list[str]:
    """Human-readable sizes, computed from the config alone (no weights are allocated); the KV
    bytes are those of a cache of `kv_cache_dtype` ("auto": the model's dtype, or "fp8")."""
    weights = " (dummy weights)" if cfg.load_format == "dummy" else ""
    kv = cfg.kv_cache_bytes_per_token(kv_cache_dtype)
    kv_dtype = "float8_e4m3fn" if normalize_kv_cache_dtype(kv_cache_dtype) == "fp8" else cfg.dtype
    return [
        f"model: {cfg.model} [{cfg.architecture}]{weights}",
        f"layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads "
        f"{cfg.num_attention_heads} (kv {cfg.num_key_value_heads}, head_dim {cfg.head_dim}), "
        f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}",
        f"parameters: {cfg.num_params / 1e9:.2f} B ({cfg.num_params:,})"
        + (f", vision tower {cfg.vision.num_params / 1e9:.2f} B" if cfg.vision else "")
        + (f", vision tower {cfg.eva_vision.num_params / 1e9:.2f} B" if cfg.eva_vision else ""),
        f"weights: {cfg.weight_bytes / 1e9:.2f} GB in {cfg.dtype}"
        + (f" (linears {cfg.quantization}" + (" incl. LM head" if cfg.quantize_lm_head else "")
           + (" and the vision tower's" if cfg.eva_vision is not None else "")
           + (" + fp32 per-channel scales)" if int4_format(cfg.quantization) is None else
              " at 4 bits + fp32 scales per group" + (" and zero points)"
                                                       if cfg.quantization.endswith("asym")
                                                       else ")"))
           if cfg.quantization else ""),
        f"KV cache: {kv / 1024:.1f} KiB per token in {kv_dtype}, "
        f"{kv * cfg.max_model_len / 2**30:.2f} GiB "
        f"for one sequence of max_model_len {cfg.max_model_len}",
        f"eos token ids: {list(cfg.eos_token_ids)}",
    ]
