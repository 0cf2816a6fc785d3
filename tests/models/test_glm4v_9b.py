"""GLM-4V-9B (ChatGLMModel + vision_config): the EVA2-CLIP tower and adapter against a dense
reference written here from the published architecture, and the whole forward (image
embeddings placed over the prompt's image span, the checkpoint's position ids) against that
tower feeding transformers' GlmForCausalLM, on a tiny random checkpoint in the shipped names."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flatout import LLM, SamplingParams
from flatout.layers.attention import AttentionMetadata, forward_context
from flatout.models.glm4v_9b import ChatGLM4VForCausalLM, expand_image_prompt
from flatout.models.registry import load_model, resolve_model_config
from tests.helpers.tiny_checkpoints import load_hf_reference, make_tiny_checkpoint

BOI, EOI, PLACEHOLDER = 290, 291, 2
VISION = {"hidden_act": "gelu", "in_channels": 3, "num_hidden_layers": 2, "hidden_size": 32,
          "patch_size": 14, "num_heads": 4, "intermediate_size": 48, "layer_norm_eps": 1e-6,
          "num_positions": 17, "image_size": 56, "scaling_factor": 8}  # 4 x 4 patches -> 2 x 2


def _vision_tensors(text_hidden: int, ffn: int, seed: int = 0) -> dict[str, torch.Tensor]:
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
    """EVA2-CLIP + adapter as published, written out densely (float32)."""
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
        x = x + ln(attn, b + "input_layernorm")
        mlp = lin(F.gelu(lin(x, b + "mlp.fc1")), b + "mlp.fc2")
        x = x + ln(mlp, b + "post_attention_layernorm")
    x = x[:, 1:]
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


@pytest.fixture(scope="module")
def glm4v(tmp_path_factory) -> tuple[Path, dict, object]:  # noqa: ANN001
    text = make_tiny_checkpoint("ChatGLMModel", tmp_path_factory.mktemp("text"))
    hf = load_hf_reference(text)  # the oracle of the text stack (before the tower is added)
    path = tmp_path_factory.mktemp("glm4v") / "glm-4v-9b"
    shutil.copytree(text, path)
    raw = json.loads((path / "config.json").read_text())
    raw.update(vision_config=VISION, boi_token_id=BOI, eoi_token_id=EOI)
    (path / "config.json").write_text(json.dumps(raw))
    sd = _vision_tensors(raw["hidden_size"], raw["ffn_hidden_size"])
    save_file(sd, str(path / "vision.safetensors"))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"].update({k: "vision.safetensors" for k in sd})
        index.write_text(json.dumps(data))
    return path, sd, hf


def _images(n: int) -> torch.Tensor:
    return torch.randn(n, 3, 56, 56, generator=torch.Generator().manual_seed(5))


def test_config_and_sizes(glm4v) -> None:  # noqa: ANN001
    path, sd, _ = glm4v
    cfg = resolve_model_config(str(path))
    eva = cfg.eva_vision
    assert eva is not None and eva.num_patch_embeds == 4 and eva.boi_token_id == BOI
    assert eva.num_params == sum(t.numel() for t in sd.values())
    preset = resolve_model_config("glm-4v-9b")
    assert preset.eva_vision is not None and preset.eva_vision.num_patch_embeds == 1600
    with torch.device("meta"):
        model = ChatGLM4VForCausalLM(preset)
    assert preset.num_params == sum(p.numel() for p in model.parameters())
    assert 4.4e9 < preset.eva_vision.num_params < 4.6e9


def test_tower_equals_the_dense_reference(glm4v) -> None:  # noqa: ANN001
    path, sd, _ = glm4v
    model = load_model(resolve_model_config(str(path)), torch.device("cpu"))
    assert isinstance(model, ChatGLM4VForCausalLM)
    images = _images(2)
    with torch.no_grad():
        ours = model.encode_images(images)
    ref = dense_tower(sd, images)
    assert ours.shape == (2, 6, model.config.hidden_size)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(ours[0], ours[1], atol=1e-3)  # the image matters


def test_positions_follow_the_checkpoint_code(glm4v) -> None:  # noqa: ANN001
    cfg = resolve_model_config(str(glm4v[0]))
    assert cfg.eva_vision is not None
    ids, pos, delta = expand_image_prompt([7, 8, BOI, PLACEHOLDER, EOI, 9, 10], cfg.eva_vision)
    assert ids == [7, 8, BOI] + [PLACEHOLDER] * 4 + [EOI, 9, 10]
    assert pos == [0, 1, 2, 3, 3, 3, 3, 4, 5, 6] and delta == 7 - 10
    with pytest.raises(ValueError, match="boi"):
        expand_image_prompt([BOI, PLACEHOLDER, 9], cfg.eva_vision)


def _hf_logits(hf, sd, prompt: list[int], images: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """The checkpoint's own placement: embeddings[:boi] + image + embeddings[eoi + 1:], positions
    [:boi + 1] + (boi + 1) repeated + [eoi:]."""
    ids = torch.tensor(prompt)
    boi, eoi = prompt.index(BOI), prompt.index(EOI)
    emb = hf.model.embed_tokens(ids)
    image = dense_tower(sd, images)[0]
    embeds = torch.cat([emb[:boi], image, emb[eoi + 1:]])
    pos = torch.arange(len(prompt))
    pos = torch.cat([pos[: boi + 1], pos[boi + 1].repeat(image.shape[0] - 2), pos[eoi:]])
    return hf(inputs_embeds=embeds[None], position_ids=pos[None]).logits[0]


def test_forward_with_an_image_equals_the_reference(glm4v) -> None:  # noqa: ANN001
    path, sd, hf = glm4v
    cfg = resolve_model_config(str(path))
    assert cfg.eva_vision is not None
    model = load_model(cfg, torch.device("cpu"))
    images = _images(1)
    prompt = [5, 6, 7, BOI, PLACEHOLDER, EOI, 11, 12, 13, 14]
    with torch.no_grad():
        expected = _hf_logits(hf, sd, prompt, images)
        ids, pos, _ = expand_image_prompt(prompt, cfg.eva_vision)
        meta = AttentionMetadata.for_prefill_without_cache([len(ids)])
        with forward_context(meta):
            hidden = model(torch.tensor(ids), torch.tensor(pos), model.encode_images(images))
        ours = model.compute_logits(hidden)
        without = _hf_logits(hf, sd, prompt, torch.zeros_like(images))
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)
    assert (ours.argmax(-1) == expected.argmax(-1)).all()
    assert not torch.allclose(expected[-1], without[-1], atol=1e-3)  # the image reaches the text


def test_text_only_through_the_engine_and_tensor_parallel(glm4v) -> None:  # noqa: ANN001
    """Without images the checkpoint serves as glm-4-9b-chat; with TP 2 the tower loads in
    shards (its linears split like the text model's) and the text still matches."""
    path, _, hf = glm4v
    prompt = [5, 6, 7, 8, 9, 10, 11]
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt)),
                          max_new_tokens=6, min_new_tokens=6, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for tp in (1, 2):
        llm = LLM(str(path), tensor_parallel_size=tp, block_size=4, num_kv_blocks=64)
        try:
            assert llm.generate([prompt], greedy)[0].token_ids == expected
        finally:
            llm.engine.core.shutdown()
