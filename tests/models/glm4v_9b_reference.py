"""A tiny random GLM-4V-9B checkpoint in the shipped layout (`ChatGLMModel` config with a
`vision_config`, tower weights `transformer.vision.*`) and a dense reference of the model.

There is no transformers class for GLM-4V-9B, so the oracle is written here from the published
architecture (THUDM/glm-4v-9b, ../shared/reference/glm_models.md §7), not from flatout's model
code: the EVA2-CLIP tower and adapter written out densely, the text stack transformers'
GlmForCausalLM (the same math as glm-4-9b-chat), and the checkpoint's own placement: the
embeddings of each boi, placeholder, eoi triple replaced by the image's 1602 (here 6) rows, the
position ids [: boi + 1], boi + 1 repeated for the patches, then [eoi :] (every image three
positions). Greedy decoding recomputes the whole sequence for every token (no KV cache).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from tests.helpers.tiny_checkpoints import load_hf_reference, make_tiny_checkpoint

BOI, EOI, PLACEHOLDER = 290, 291, 0  # PLACEHOLDER: the config's pad_token_id (<|endoftext|>)
VISION: dict[str, Any] = {
    "hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 2, "hidden_size": 32,
    "patch_size": 14, "num_heads": 4, "intermediate_size": 48, "layer_norm_eps": 1e-6,
    "num_positions": 17, "image_size": 56, "scaling_factor": 8,
}  # 4 x 4 patches -> 2 x 2 after the conv: 4 + boi + eoi = 6 embeddings per image
IMAGE_SIZE = VISION["image_size"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def vision_tensors(text_hidden: int, ffn: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, i, p = VISION["hidden_size"], VISION["intermediate_size"], VISION["patch_size"]

    def rand(*shape: int, scale: float = 0.0) -> torch.Tensor:
        fan_in = shape[-1] if len(shape) > 1 else 1
        return torch.randn(*shape, generator=g) * (scale or 1 / math.sqrt(fan_in))

    v = "transformer.vision."
    sd = {
        v + "patch_embedding.proj.weight": rand(h, 3, p, p, scale=1 / math.sqrt(3 * p * p)),
        v + "patch_embedding.proj.bias": rand(h, scale=0.1),
        v + "patch_embedding.cls_embedding": rand(1, h, scale=1.0),
        v + "patch_embedding.position_embedding.weight": rand(VISION["num_positions"], h,
                                                              scale=1.0),
        v + "conv.weight": rand(text_hidden, h, 2, 2, scale=1 / math.sqrt(4 * h)),
        v + "conv.bias": rand(text_hidden, scale=0.1),
        v + "linear_proj.linear_proj.weight": rand(text_hidden, text_hidden),
        v + "linear_proj.norm1.weight": 1 + rand(text_hidden, scale=0.2),
        v + "linear_proj.norm1.bias": rand(text_hidden, scale=0.2),
        v + "linear_proj.gate_proj.weight": rand(ffn, text_hidden),
        v + "linear_proj.dense_h_to_4h.weight": rand(ffn, text_hidden),
        v + "linear_proj.dense_4h_to_h.weight": rand(text_hidden, ffn),
        v + "boi": rand(1, 1, text_hidden, scale=4.0),
        v + "eoi": rand(1, 1, text_hidden, scale=4.0),
    }
    for n in range(VISION["num_hidden_layers"]):
        b = f"{v}transformer.layers.{n}."
        sd |= {
            b + "input_layernorm.weight": 1 + rand(h, scale=0.2),
            b + "input_layernorm.bias": rand(h, scale=0.2),
            b + "post_attention_layernorm.weight": 1 + rand(h, scale=0.2),
            b + "post_attention_layernorm.bias": rand(h, scale=0.2),
            b + "attention.query_key_value.weight": rand(3 * h, h, scale=2 / math.sqrt(h)),
            b + "attention.query_key_value.bias": rand(3 * h, scale=0.1),
            b + "attention.dense.weight": rand(h, h),
            b + "attention.dense.bias": rand(h, scale=0.1),
            b + "mlp.fc1.weight": rand(i, h),
            b + "mlp.fc1.bias": rand(i, scale=0.1),
            b + "mlp.fc2.weight": rand(h, i),
            b + "mlp.fc2.bias": rand(h, scale=0.1),
        }
    return sd


def dense_tower(sd: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """EVA2-CLIP + adapter as published, written out densely (float32):
    images [N, 3, S, S] (preprocessed) -> [N, 2 + (S / 28)^2, text hidden]."""
    v = "transformer.vision."
    h, heads, eps = VISION["hidden_size"], VISION["num_heads"], VISION["layer_norm_eps"]

    def lin(x: torch.Tensor, name: str, bias: bool = True) -> torch.Tensor:
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"] if bias else None)

    def ln(x: torch.Tensor, name: str, e: float = eps) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], e)

    p = VISION["patch_size"]
    x = F.conv2d(images, sd[v + "patch_embedding.proj.weight"],
                 sd[v + "patch_embedding.proj.bias"], stride=p)
    x = x.flatten(2).transpose(1, 2)
    cls = sd[v + "patch_embedding.cls_embedding"].expand(x.shape[0], 1, h)
    x = torch.cat([cls, x], 1) + sd[v + "patch_embedding.position_embedding.weight"]
    n, length = x.shape[:2]
    for i in range(VISION["num_hidden_layers"]):
        b = f"{v}transformer.layers.{i}."
        qkv = lin(x, b + "attention.query_key_value").view(n, length, 3, heads, h // heads)
        q, k, vv = (qkv[:, :, j].transpose(1, 2) for j in range(3))
        probs = (q @ k.transpose(-1, -2) / math.sqrt(h // heads)).softmax(-1)
        attn = lin((probs @ vv).transpose(1, 2).reshape(n, length, h), b + "attention.dense")
        x = x + ln(attn, b + "input_layernorm")  # post-norm: the branch output is normalised
        mlp = lin(F.gelu(lin(x, b + "mlp.fc1")), b + "mlp.fc2")
        x = x + ln(mlp, b + "post_attention_layernorm")
    x = x[:, 1:]  # CLS dropped
    grid = int(math.isqrt(x.shape[1]))
    x = x.reshape(n, grid, grid, h).permute(0, 3, 1, 2)
    x = F.conv2d(x, sd[v + "conv.weight"], sd[v + "conv.bias"], stride=2).flatten(2)
    x = x.transpose(1, 2)
    g = v + "linear_proj."
    x = F.gelu(ln(lin(x, g + "linear_proj", bias=False), g + "norm1", 1e-5))
    x = lin(F.silu(lin(x, g + "gate_proj", False)) * lin(x, g + "dense_h_to_4h", False),
            g + "dense_4h_to_h", False)
    x = torch.cat([sd[v + "boi"].expand(n, 1, -1), x, sd[v + "eoi"].expand(n, 1, -1)], 1)
    return x / VISION["scaling_factor"]


def preprocess(image: np.ndarray) -> torch.Tensor:
    """The checkpoint's image transform: PIL bicubic resize to S x S, to [0, 1], CLIP mean/std."""
    pil = Image.fromarray(image)
    if pil.size != (IMAGE_SIZE, IMAGE_SIZE):
        pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


def make_tiny_glm4v_9b_checkpoint(path: Path, *, seed: int = 0, boi: int = BOI, eoi: int = EOI,
                                  **text_overrides: Any) -> tuple[Path, dict[str, torch.Tensor]]:
    """The glm-4-9b-chat tiny text checkpoint (make_tiny_checkpoint's overrides) plus the
    tower's tensors in their own shard and the vision_config / boi / eoi keys in config.json;
    returns (path, tower tensors)."""
    text = make_tiny_checkpoint("ChatGLMModel", path.with_name(path.name + "-text"), seed=seed,
                                **text_overrides)
    shutil.copytree(text, path)
    raw = json.loads((path / "config.json").read_text())
    raw.update(vision_config=VISION, boi_token_id=boi, eoi_token_id=eoi)
    (path / "config.json").write_text(json.dumps(raw))
    sd = vision_tensors(raw["hidden_size"], raw["ffn_hidden_size"], seed)
    save_file(sd, str(path / "vision.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].update({k: "vision.safetensors" for k in sd})
        index.write_text(json.dumps(data))
    return path, sd


class DenseGLM4V9B:
    """The reference model of a checkpoint written by make_tiny_glm4v_9b_checkpoint."""

    def __init__(self, path: Path, sd: dict[str, torch.Tensor]) -> None:
        raw = json.loads((Path(path) / "config.json").read_text())
        self.boi, self.eoi = raw["boi_token_id"], raw["eoi_token_id"]
        self.sd = sd
        self.text = load_hf_reference(path)  # GlmForCausalLM over the text tensors only

    def _inputs(self, ids: list[int], images: list[np.ndarray]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings and position ids, placed as the checkpoint's code does (each image
        span boi, placeholder, eoi in turn)."""
        emb = self.text.model.embed_tokens(torch.tensor(ids))
        feats = (dense_tower(self.sd, torch.stack([preprocess(i) for i in images]))
                 if images else None)
        pos = torch.arange(len(ids))
        parts_e, parts_p = [], []
        prev, k = 0, 0
        for i, t in enumerate(ids):
            if t != self.boi or k >= len(images):
                continue
            assert ids[i + 2] == self.eoi, "the checkpoint asserts eoi - boi == 2"
            assert feats is not None
            patches = feats.shape[1] - 2
            parts_e += [emb[prev:i], feats[k]]
            parts_p += [pos[prev : i + 1], pos[i + 1].repeat(patches), pos[i + 2 : i + 3]]
            prev, k = i + 3, k + 1
        assert k == len(images), "an image without its boi, placeholder, eoi span"
        parts_e.append(emb[prev:])
        parts_p.append(pos[prev:])
        return torch.cat(parts_e), torch.cat(parts_p)

    @torch.no_grad()
    def greedy(self, ids: list[int], images: list[np.ndarray], n: int) -> list[int]:
        out: list[int] = []
        for _ in range(n):
            embeds, pos = self._inputs(ids + out, images)
            logits = self.text(inputs_embeds=embeds[None], position_ids=pos[None]).logits
            out.append(int(logits[0, -1].argmax()))
        return out
