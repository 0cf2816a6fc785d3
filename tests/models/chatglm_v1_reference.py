"""A tiny random ChatGLM-6B v1 checkpoint in the real layout, and a dense reference of the model.

transformers has no ChatGLM-6B v1 class, so the oracle is written here from the published
architecture (THUDM/chatglm-6b, ../shared/reference/glm_models.md §1.1), not from flatout's model
code: no KV cache, no batching, the whole sequence recomputed for every generated token with the
checkpoint's own attention mask and 2-D position ids.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import sentencepiece as spm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flatout.tokenizers.chatglm_v1 import CHATGLM_V1_SPECIAL_TOKENS
from tests.tokenizers.tokenizer_fixtures import SPM_CORPUS

# the special ids sit at the top of the tiny vocabulary, in the real checkpoint's order
MASK, GMASK, SOP, EOP = 140, 141, 144, 145
TINY_V1_CONFIG: dict[str, Any] = {
    "architectures": ["ChatGLMModel"],
    "model_type": "chatglm",
    "vocab_size": 150,
    "hidden_size": 64,
    "num_layers": 2,
    "num_attention_heads": 4,
    "inner_hidden_size": 96,
    "layernorm_epsilon": 1e-5,
    "max_sequence_length": 256,
    "position_encoding_2d": True,
    "bos_token_id": SOP,
    "eos_token_id": EOP,
    "mask_token_id": MASK,
    "gmask_token_id": GMASK,
    "pad_token_id": 3,
    "torch_dtype": "float32",
    "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},
}


def make_tiny_v1_checkpoint(path: Path, seed: int = 0, **overrides: Any) -> Path:
    """config.json + model.safetensors with the checkpoint's tensor names; weights drawn so
    that every part (norm biases, 2-D positions, the bidirectional mask) changes the logits."""
    cfg = {**TINY_V1_CONFIG, **overrides}
    h, layers, inner = cfg["hidden_size"], cfg["num_layers"], cfg["inner_hidden_size"]
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {"transformer.word_embeddings.weight": rand(cfg["vocab_size"], h, scale=1.0)}
    for i in range(layers):
        p = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            sd[p + norm + ".weight"] = 1 + rand(h, scale=0.2)
            sd[p + norm + ".bias"] = rand(h, scale=0.2)
        sd[p + "attention.query_key_value.weight"] = rand(3 * h, h, scale=2.0 / math.sqrt(h))
        sd[p + "attention.query_key_value.bias"] = rand(3 * h, scale=0.2)
        sd[p + "attention.dense.weight"] = rand(h, h, scale=1 / math.sqrt(h))
        sd[p + "attention.dense.bias"] = rand(h, scale=0.2)
        sd[p + "mlp.dense_h_to_4h.weight"] = rand(inner, h, scale=1 / math.sqrt(h))
        sd[p + "mlp.dense_h_to_4h.bias"] = rand(inner, scale=0.2)
        sd[p + "mlp.dense_4h_to_h.weight"] = rand(h, inner, scale=1 / math.sqrt(inner))
        sd[p + "mlp.dense_4h_to_h.bias"] = rand(h, scale=0.2)
        # the real checkpoint carries its rotary buffer; the loader must drop it
        sd[p + "attention.rotary_emb.inv_freq"] = torch.ones(h // cfg["num_attention_heads"] // 4)
    sd["transformer.final_layernorm.weight"] = 1 + rand(h, scale=0.2)
    sd["transformer.final_layernorm.bias"] = rand(h, scale=0.2)
    sd["lm_head.weight"] = rand(cfg["vocab_size"], h, scale=2 / math.sqrt(h))
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": EOP}))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return path


class DenseChatGLMv1:
    """The checkpoint's forward, written out densely in float32."""

    def __init__(self, path: Path) -> None:
        from safetensors.torch import load_file

        self.cfg = json.loads((path / "config.json").read_text())
        self.sd = load_file(str(path / "model.safetensors"))

    def _rotate(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """x [L, H, d] rotated by pos [L], NeoX halves, with the fp16 tables of the original."""
        d = x.shape[-1]
        inv_freq = (1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)).half()
        angles = (pos.half()[:, None] * inv_freq[None, :]).float()  # fp16 product, like the code
        emb = torch.cat([angles, angles], dim=-1)
        cos, sin = emb.cos().half().float()[:, None, :], emb.sin().half().float()[:, None, :]
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def logits(self, ids: list[int]) -> torch.Tensor:  # [L, vocab]
        c, sd = self.cfg, self.sd
        n, heads, h = len(ids), c["num_attention_heads"], c["hidden_size"]
        hd, eps = h // heads, c["layernorm_epsilon"]
        alpha = math.sqrt(2 * c["num_layers"])
        context = ids.index(c["bos_token_id"])
        mask_tok = c["gmask_token_id"] if c["gmask_token_id"] in ids else c["mask_token_id"]
        mask_pos = ids.index(mask_tok)
        pos = torch.tensor([i if i < context else mask_pos for i in range(n)])
        block = torch.tensor([0 if i < context else i - context + 1 for i in range(n)])
        allowed = torch.tril(torch.ones(n, n, dtype=torch.bool))
        allowed[:, :context] = True

        def ln(x: torch.Tensor, name: str) -> torch.Tensor:
            return F.layer_norm(x, (h,), sd[name + ".weight"], sd[name + ".bias"], eps)

        def lin(x: torch.Tensor, name: str) -> torch.Tensor:
            return x @ sd[name + ".weight"].T + sd[name + ".bias"]

        x = sd["transformer.word_embeddings.weight"][torch.tensor(ids)]
        for i in range(c["num_layers"]):
            p = f"transformer.layers.{i}."
            a = ln(x, p + "input_layernorm")
            qkv = lin(a, p + "attention.query_key_value").view(n, heads, 3 * hd)
            q, k, v = qkv.chunk(3, dim=-1)  # per head: q | k | v
            q1, q2 = q.chunk(2, dim=-1)
            k1, k2 = k.chunk(2, dim=-1)
            q = torch.cat([self._rotate(q1, pos), self._rotate(q2, block)], dim=-1)
            k = torch.cat([self._rotate(k1, pos), self._rotate(k2, block)], dim=-1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
            probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
            attn = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, h)
            x = a * alpha + lin(attn, p + "attention.dense")
            b = ln(x, p + "post_attention_layernorm")
            mlp = lin(F.gelu(lin(b, p + "mlp.dense_h_to_4h"), approximate="tanh"),
                      p + "mlp.dense_4h_to_h")
            x = b * alpha + mlp
        x = ln(x, "transformer.final_layernorm")
        return x @ sd["lm_head.weight"].T

    def greedy(self, prompt: list[int], new_tokens: int) -> list[int]:
        ids = list(prompt)
        for _ in range(new_tokens):
            ids.append(int(self.logits(ids)[-1].argmax()))
        return ids[len(prompt) :]


WHITESPACE_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]


def train_ice_text(path: Path) -> Path:
    """A SentencePiece model with the v1 special and whitespace pieces, like ice_text.model."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 30),
        model_writer=proto,
        vocab_size=700,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        user_defined_symbols=list(CHATGLM_V1_SPECIAL_TOKENS) + WHITESPACE_PIECES + ["<pad>"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    path.write_bytes(proto.getvalue())
    return path
