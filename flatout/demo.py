"""The built-in demo model: a tiny GLM-4-0414-architecture checkpoint with a real trained tokenizer.

`flatout serve`, `flatout generate` and `LLM()` use it when no model is given. The tokenizer files
are shipped in `flatout/assets/demo/` (see `build_tokenizer.py` there); the random weights are
created on first use in the cache folder `$FLATOUT_CACHE/demo-v1` (default
`~/.cache/flatout/demo-v1`). The folder is built in a temporary directory and renamed into place,
so concurrent first uses are safe: whoever renames first wins and the others use its result.
Creation is deterministic (same bytes every time).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

DEMO_NAME = "demo-v1"
ASSETS = Path(__file__).resolve().parent / "assets" / "demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
WEIGHTS_FILE = "model.safetensors"
SEED = 20240414

# Ids of the shipped tokenizer (its special tokens follow the 4084 trained ones).
ENDOFTEXT_ID, USER_ID, OBSERVATION_ID = 4084, 4091, 4093
STOP_TOKEN_IDS = [ENDOFTEXT_ID, USER_ID, OBSERVATION_ID]

DEMO_CONFIG: dict = {
    "architectures": ["Glm4ForCausalLM"],
    "model_type": "glm4",
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "partial_rotary_factor": 0.5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-05,
    "hidden_act": "silu",
    "attention_bias": True,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "use_cache": True,
    "bos_token_id": None,
    "pad_token_id": ENDOFTEXT_ID,
    "eos_token_id": STOP_TOKEN_IDS,
    "torch_dtype": "float32",
}
GENERATION_CONFIG: dict = {"eos_token_id": STOP_TOKEN_IDS, "pad_token_id": ENDOFTEXT_ID}


def cache_root() -> Path:
    """Where flatout keeps generated files: `$FLATOUT_CACHE`, else `~/.cache/flatout`."""
    configured = os.environ.get("FLATOUT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "flatout"


def _demo_weights(config: dict) -> dict[str, np.ndarray]:
    """Seeded random float32 weights for every parameter of `Glm4ForCausalLM`.

    Scaled so that activations keep unit size through the layers and the logits are spread out
    (std ~2): greedy decoding then has clear winners, which makes token-for-token comparisons
    against other implementations robust. Norm weights and biases are random too, so that an
    implementation which ignores one of them produces different tokens.
    """
    # The legacy RandomState stream is frozen by NumPy, so the weights are the same everywhere.
    rng = np.random.RandomState(SEED)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim, vocab = config["head_dim"], config["vocab_size"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim

    def linear(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32)

    def vector(size: int, mean: float, std: float) -> np.ndarray:
        return (mean + std * rng.standard_normal(size)).astype(np.float32)

    weights = {"model.embed_tokens.weight": linear(vocab, hidden, gain=np.sqrt(hidden))}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = vector(hidden, 1.0, 0.1)
        for name, rows in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            weights[p + f"self_attn.{name}.weight"] = linear(rows, hidden)
            weights[p + f"self_attn.{name}.bias"] = vector(rows, 0.0, 0.1)
        weights[p + "self_attn.o_proj.weight"] = linear(hidden, q_dim)
        weights[p + "post_self_attn_layernorm.weight"] = vector(hidden, 1.0, 0.1)
        weights[p + "post_attention_layernorm.weight"] = vector(hidden, 1.0, 0.1)
        weights[p + "mlp.gate_up_proj.weight"] = linear(2 * inter, hidden)
        weights[p + "mlp.down_proj.weight"] = linear(hidden, inter)
        weights[p + "post_mlp_layernorm.weight"] = vector(hidden, 1.0, 0.1)
    weights["model.norm.weight"] = vector(hidden, 1.0, 0.1)
    weights["lm_head.weight"] = linear(vocab, hidden, gain=2.0)
    return weights


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_demo_checkpoint(folder: str | os.PathLike[str]) -> None:
    """Write the complete demo checkpoint (config, generation config, weights, tokenizer) to
    `folder`, which must exist. Same bytes on every call."""
    folder = Path(folder)
    _write_json(folder / "config.json", DEMO_CONFIG)
    _write_json(folder / "generation_config.json", GENERATION_CONFIG)
    save_file(_demo_weights(DEMO_CONFIG), str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    for name in TOKENIZER_FILES:
        shutil.copyfile(ASSETS / name, folder / name)


def _is_complete(folder: Path) -> bool:
    names = ("config.json", "generation_config.json", WEIGHTS_FILE, *TOKENIZER_FILES)
    return all((folder / name).is_file() for name in names)


def _refresh_tokenizer_files(folder: Path) -> None:
    """Bring the tokenizer files of an existing demo folder up to the shipped ones (a folder made
    by an older flatout keeps its weights, which never change, but gets a newer template).
    Each file is replaced atomically, so concurrent users see the old or the new file."""
    for name in TOKENIZER_FILES:
        shipped = (ASSETS / name).read_bytes()
        if (folder / name).read_bytes() != shipped:
            fd, staging = tempfile.mkstemp(prefix=f".{name}-", dir=folder)
            with os.fdopen(fd, "wb") as f:
                f.write(shipped)
            os.replace(staging, folder / name)


def demo_model_path() -> str:
    """Path of the demo checkpoint folder, creating it on first use (safe under concurrency)."""
    target = cache_root() / DEMO_NAME
    if _is_complete(target):
        _refresh_tokenizer_files(target)
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}-", dir=target.parent))
    try:
        write_demo_checkpoint(staging)
        try:
            os.rename(staging, target)  # atomic; fails if another process created target first
        except OSError:
            if not _is_complete(target):
                raise RuntimeError(
                    f"{target} exists but is incomplete; delete it and try again"
                ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
