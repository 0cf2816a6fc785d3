"""A tiny checkpoint that writes scripted replies, token by token, whatever the prompt.

The demo checkpoint (same architecture, same tokenizer) with one added token per piece of text
of each script, appended after the demo's vocabulary, and weights set so that the next token
depends only on the current one (as in thinking_checkpoint.py: attention and MLP outputs are
zero, so the residual stream is the token's embedding; each piece has its own embedding axis and
the LM head maps it to the script's next piece, the last one to `<|endoftext|>`). Every other
token, the prompt's last one included, has a zero embedding, so its logits are all zero: a
request picks a script with `logit_bias` (+100) on the script's first piece, and from there the
chain's logit (far above 100) wins at every step. The reply is then the script's pieces, one
token each (so a stream gets them one delta at a time), and `finish_reason: "stop"`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

from flatout.demo import ENDOFTEXT_ID, WEIGHTS_FILE, demo_model_path

_LOGIT = 40.0  # per unit of the normalized state (x sqrt(hidden) = 452 > logit_bias's 100)


def make_scripted_checkpoint(path: Path, scripts: dict[str, list[str]],
                             chat_template: str | None = None) -> dict[str, int]:
    """Write the checkpoint to `path`; returns each script's first token id (the one to bias).
    Pieces must differ from one another (each token leads to exactly one next token)."""
    pieces = [piece for script in scripts.values() for piece in script]
    assert len(set(pieces)) == len(pieces), "every piece of every script must be unique"
    src = Path(demo_model_path())
    path.mkdir(parents=True, exist_ok=True)
    for name in ("generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(src / name, path / name)
    if chat_template is not None:
        (path / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    config = json.loads((src / "config.json").read_text())
    base_vocab, hidden = config["vocab_size"], config["hidden_size"]
    assert len(pieces) <= hidden, "one embedding axis per piece"
    config["vocab_size"] = base_vocab + len(pieces)
    (path / "config.json").write_text(json.dumps(config, indent=2))

    tok = json.loads((src / "tokenizer.json").read_text())
    ids: dict[str, int] = {piece: base_vocab + i for i, piece in enumerate(pieces)}
    tok["added_tokens"] += [{"id": i, "content": piece, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": False}
                            for piece, i in ids.items()]
    (path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))

    weights = load_file(str(src / WEIGHTS_FILE))
    vocab = config["vocab_size"]
    embed = np.zeros((vocab, hidden), np.float32)
    lm_head = np.zeros((vocab, hidden), np.float32)
    axis = 0
    for script in scripts.values():
        chain = [ids[p] for p in script] + [ENDOFTEXT_ID]
        for token, successor in zip(chain, chain[1:], strict=False):
            embed[token, axis] = 1.0
            lm_head[successor, axis] = _LOGIT
            axis += 1
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = lm_head
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    for name, w in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            weights[name] = np.zeros_like(w)
    save_file(weights, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return {name: ids[script[0]] for name, script in scripts.items()}
