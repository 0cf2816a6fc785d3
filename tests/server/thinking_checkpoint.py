"""A tiny GLM-4-0414 checkpoint that deterministically writes `<think>REASONING</think>ANSWER`.

It is the demo checkpoint (same config, same real tokenizer) with GLM-Z1's chat template, which
opens `<think>` unless `enable_thinking=False` (the demo's own thinks only when asked), and with
weights set so that the next token depends only on the current one: every attention output and
MLP output projection is zero, so the residual stream is just the token's embedding; each token
of a chain gets its own embedding axis, and the LM head maps that axis to the chain's next token.
Whatever the prompt, the reply follows the chain from the prompt's last token:

    "\\n" → <think> → " think about it" → </think> → "我是一个小模型。" → <|endoftext|>

so a prompt ending in `<think>` (the template's thinking mode) gets only the closing tag, and
one ending in "\\n" (thinking switched off) makes the model open the tag itself.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file
from transformers import PreTrainedTokenizerFast

from flatout.demo import ASSETS, ENDOFTEXT_ID, TOKENIZER_FILES, WEIGHTS_FILE, demo_model_path
from flatout.tokenizers.templates import GLM4_0414_CHAT_TEMPLATE

REASONING = "think about it"
ANSWER = "我是一个小模型。"
_LOGIT = 30.0  # per unit of the normalized state: the chain's next token wins by far


def thinking_chain() -> list[int]:
    tok = PreTrainedTokenizerFast.from_pretrained(str(ASSETS))
    ids = tok.convert_tokens_to_ids
    chain = [*tok.encode("\n"), ids("<think>"), *tok.encode(" " + REASONING), ids("</think>"),
             *tok.encode(ANSWER), ENDOFTEXT_ID]
    keys = chain[:-1]
    assert len(set(keys)) == len(keys), "each chain token must lead to exactly one next token"
    return chain


def make_thinking_checkpoint(path: Path, *, special_tags: bool = False) -> Path:
    """`special_tags`: the tokenizer marks `<think>` and `</think>` special (same ids), so
    decoding with skip_special_tokens erases them from the text."""
    src = Path(demo_model_path())
    path.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        shutil.copyfile(src / name, path / name)
    if special_tags:
        tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
        tok.save_pretrained(str(path))
    (path / "chat_template.jinja").write_text(GLM4_0414_CHAT_TEMPLATE, encoding="utf-8")
    weights = load_file(str(src / WEIGHTS_FILE))
    embed = weights["model.embed_tokens.weight"]
    vocab, hidden = embed.shape
    chain = thinking_chain()
    assert len(chain) <= hidden
    new_embed = np.zeros((vocab, hidden), np.float32)
    lm_head = np.zeros((vocab, hidden), np.float32)
    for axis, (token, successor) in enumerate(zip(chain, chain[1:], strict=False)):
        new_embed[token, axis] = 1.0
        lm_head[successor, axis] = _LOGIT
    weights["model.embed_tokens.weight"] = new_embed
    weights["lm_head.weight"] = lm_head
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    for name, w in weights.items():
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            weights[name] = np.zeros_like(w)
    save_file(weights, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    return path
