"""Model resolution and loading: checkpoint folder or preset -> ModelConfig -> loaded model."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from flatout.config import EngineArgs, ModelConfig
from flatout.models.decoder import CausalLM
from flatout.models.glm4v import Glm4vForConditionalGeneration
from flatout.models.hf_config import (
    CHATGLM_ARCHITECTURES,
    VISION_ARCHITECTURES,
    eos_list,
    parse_hf_config,
)
from flatout.models.loader import init_dummy_weights, load_safetensors_weights
from flatout.models.presets import PRESETS
from flatout.models.weight_names import (
    CHATGLM_WEIGHT_NAMES,
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


def weight_names_for(architecture: str) -> WeightNameMap:
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
    )


def resolve_model_config(
    model: str,
    *,
    dtype: str = "auto",
    device_type: str = "cpu",
    max_model_len: int | None = None,
    load_format: str = "auto",
    tokenizer: str | None = None,
) -> ModelConfig:
    """Resolve a checkpoint folder or preset name into a ModelConfig.

    dtype "auto": float32 on CPU; on a GPU the checkpoint's bf16/fp16 dtype, else bfloat16 (fp16
    on GPUs without bf16). max_model_len defaults to the model's context length and may not
    exceed it. Sampling defaults come from generation_config.json: temperature/top_p/top_k/min_p
    only when it does not say do_sample: false (then they describe a sampler the authors switched
    off), repetition_penalty always. EOS ids are config.json's followed by generation_config's.
    """
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
    )


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


def load_model(
    cfg: ModelConfig, device: torch.device
) -> CausalLM | Glm4vForConditionalGeneration:
    """Build the model for `cfg` on `device` in cfg.dtype and fill its weights (eval mode)."""
    model: CausalLM | Glm4vForConditionalGeneration
    with _default_dtype(TORCH_DTYPES[cfg.dtype]), torch.device(device):
        if cfg.architecture in VISION_ARCHITECTURES:
            model = Glm4vForConditionalGeneration(cfg)
        else:
            model = CausalLM(cfg)
    if cfg.load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_safetensors_weights(
            model, cfg.model, weight_names_for(cfg.architecture), cfg.tie_word_embeddings
        )
    model.eval()
    return model


def model_info_lines(cfg: ModelConfig) -> list[str]:
    """Human-readable sizes, computed from the config alone (no weights are allocated)."""
    weights = " (dummy weights)" if cfg.load_format == "dummy" else ""
    kv = cfg.kv_bytes_per_token
    return [
        f"model: {cfg.model} [{cfg.architecture}]{weights}",
        f"layers {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, heads "
        f"{cfg.num_attention_heads} (kv {cfg.num_key_value_heads}, head_dim {cfg.head_dim}), "
        f"intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}",
        f"parameters: {cfg.num_params / 1e9:.2f} B ({cfg.num_params:,})"
        + (f", vision tower {cfg.vision.num_params / 1e9:.2f} B" if cfg.vision else ""),
        f"weights: {cfg.weight_bytes / 1e9:.2f} GB in {cfg.dtype}",
        f"KV cache: {kv / 1024:.1f} KiB per token, {kv * cfg.max_model_len / 2**30:.2f} GiB "
        f"for one sequence of max_model_len {cfg.max_model_len}",
        f"eos token ids: {list(cfg.eos_token_ids)}",
    ]
