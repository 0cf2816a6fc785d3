"""The built-in vision demo model (`--model demo-vl`): a tiny GLM-4.1V-architecture checkpoint.

Like the text demo (demo.py) it is made on first use, deterministically, in the cache folder
(`$FLATOUT_CACHE/demo-vl-v1`), so a new user can send an image request on a fresh machine:
the demo's trained tokenizer plus GLM-4.1V's three image tokens (ids 4096-4098), its chat
template, and seeded random weights for the vision tower and the M-RoPE text decoder. It
answers nonsense, but through every step the real models take.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from flatout.demo import ASSETS, ENDOFTEXT_ID, STOP_TOKEN_IDS, WEIGHTS_FILE, cache_root

DEMO_VL_ALIAS = "demo-vl"
DEMO_VL_NAME = "demo-vl-v1"
SEED = 20250701
IMAGE_TOKENS = {"<|begin_of_image|>": 4096, "<|image|>": 4097, "<|end_of_image|>": 4098}
FILES = ("config.json", "generation_config.json", WEIGHTS_FILE, "tokenizer.json",
         "tokenizer_config.json", "chat_template.jinja")

TEXT: dict[str, Any] = {"vocab_size": 4104, "hidden_size": 128, "intermediate_size": 384,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "attention_bias": True,
        "hidden_act": "silu", "pad_token_id": ENDOFTEXT_ID, "eos_token_id": STOP_TOKEN_IDS,
        "model_type": "glm4v_text",
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3],
                            "partial_rotary_factor": 0.5, "rope_theta": 10000.0}}
VISION: dict[str, Any] = {"depth": 2, "hidden_size": 64, "num_heads": 2, "out_hidden_size": 128,
          "intermediate_size": 256, "image_size": 112, "patch_size": 14,
          "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
          "rms_norm_eps": 1e-5, "attention_bias": False, "hidden_act": "silu",
          "model_type": "glm4v_vision", "rope_parameters": {"rope_theta": 10000.0}}
DEMO_VL_CONFIG: dict = {
    "architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v",
    "text_config": TEXT, "vision_config": VISION, "tie_word_embeddings": False,
    "image_start_token_id": 4096, "image_token_id": 4097, "image_end_token_id": 4098,
    "video_start_token_id": 4099, "video_end_token_id": 4100, "video_token_id": 4101,
    "torch_dtype": "float32",
}


def _weights() -> dict[str, np.ndarray]:
    """Seeded random float32 weights under the checkpoint's names (as transformers saves
    Glm4vForConditionalGeneration), scaled to keep activations near unit size."""
    rng = np.random.RandomState(SEED)

    def linear(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32)

    def vector(size: int, mean: float = 1.0, std: float = 0.1) -> np.ndarray:
        return (mean + std * rng.standard_normal(size)).astype(np.float32)

    w: dict[str, np.ndarray] = {}
    h, inter, vocab = TEXT["hidden_size"], TEXT["intermediate_size"], TEXT["vocab_size"]
    head = h // TEXT["num_attention_heads"]
    kv = TEXT["num_key_value_heads"] * head
    lm = "model.language_model."
    w[lm + "embed_tokens.weight"] = linear(vocab, h, gain=np.sqrt(h))
    for i in range(TEXT["num_hidden_layers"]):
        p = f"{lm}layers.{i}."
        for name in ("input_layernorm", "post_self_attn_layernorm", "post_attention_layernorm",
                     "post_mlp_layernorm"):
            w[p + name + ".weight"] = vector(h)
        for name, rows in (("q_proj", h), ("k_proj", kv), ("v_proj", kv)):
            w[p + f"self_attn.{name}.weight"] = linear(rows, h)
            w[p + f"self_attn.{name}.bias"] = vector(rows, 0.0)
        w[p + "self_attn.o_proj.weight"] = linear(h, h)
        w[p + "mlp.gate_up_proj.weight"] = linear(2 * inter, h)
        w[p + "mlp.down_proj.weight"] = linear(h, inter)
    w[lm + "norm.weight"] = vector(h)
    w["lm_head.weight"] = linear(vocab, h, gain=2.0)

    vh, vo, vi = VISION["hidden_size"], VISION["out_hidden_size"], VISION["intermediate_size"]
    patch, m = VISION["patch_size"], VISION["spatial_merge_size"]
    v = "model.visual."
    w[v + "patch_embed.proj.weight"] = linear(vh, 3 * 2 * patch * patch).reshape(
        vh, 3, 2, patch, patch)
    w[v + "patch_embed.proj.bias"] = vector(vh, 0.0)
    w[v + "post_conv_layernorm.weight"] = vector(vh)
    w[v + "embeddings.position_embedding.weight"] = linear(
        (VISION["image_size"] // patch) ** 2, vh, gain=0.5 * np.sqrt(vh))
    for i in range(VISION["depth"]):
        p = f"{v}blocks.{i}."
        w[p + "norm1.weight"], w[p + "norm2.weight"] = vector(vh), vector(vh)
        w[p + "attn.qkv.weight"] = linear(3 * vh, vh)
        w[p + "attn.proj.weight"] = linear(vh, vh)
        w[p + "mlp.gate_proj.weight"] = linear(vo, vh)
        w[p + "mlp.up_proj.weight"] = linear(vo, vh)
        w[p + "mlp.down_proj.weight"] = linear(vh, vo)
    w[v + "post_layernorm.weight"] = vector(vh)
    w[v + "downsample.weight"] = linear(vo, vh * m * m).reshape(vo, vh, m, m)
    w[v + "downsample.bias"] = vector(vo, 0.0)
    w[v + "merger.proj.weight"] = linear(vo, vo)
    w[v + "merger.post_projection_norm.weight"] = vector(vo)
    w[v + "merger.post_projection_norm.bias"] = vector(vo, 0.0)
    w[v + "merger.gate_proj.weight"] = linear(vi, vo)
    w[v + "merger.up_proj.weight"] = linear(vi, vo)
    w[v + "merger.down_proj.weight"] = linear(vo, vi)
    return w


def write_demo_vl_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Write the whole vision demo checkpoint into `folder` (which must exist); same bytes on
    every call."""
    folder = Path(folder)
    (folder / "config.json").write_text(json.dumps(DEMO_VL_CONFIG, indent=2) + "\n")
    gen = {"eos_token_id": STOP_TOKEN_IDS, "pad_token_id": ENDOFTEXT_ID}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    save_file(_weights(), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    tokenizer = json.loads((ASSETS / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["added_tokens"] += [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True} for t, i in IMAGE_TOKENS.items()]
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False),
                                           encoding="utf-8")
    config = json.loads((ASSETS / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["extra_special_tokens"] = [*config.get("extra_special_tokens", []), *IMAGE_TOKENS]
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(ASSETS / "chat_template.jinja", folder / "chat_template.jinja")


def demo_vl_model_path() -> str:
    """Path of the vision demo checkpoint, creating it on first use (safe under concurrency:
    built in a temporary folder and renamed into place; whoever renames first wins)."""
    target = cache_root() / DEMO_VL_NAME
    if all((target / f).is_file() for f in FILES):
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_VL_NAME}-", dir=target.parent))
    try:
        write_demo_vl_checkpoint(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not all((target / f).is_file() for f in FILES):
                raise RuntimeError(
                    f"{target} exists but is incomplete; delete it and try again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
