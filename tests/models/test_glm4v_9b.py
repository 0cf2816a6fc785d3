"""GLM-4V-9B (ChatGLMModel + vision_config): the EVA2-CLIP tower and adapter against a dense
reference written here from the published architecture, and the whole forward (image
embeddings placed over the prompt's image span, the checkpoint's position ids) against that
tower feeding transformers' GlmForCausalLM, on a tiny random checkpoint in the shipped names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatout import LLM, SamplingParams
from flatout.layers.attention import AttentionMetadata, forward_context
from flatout.models.glm4v_9b import ChatGLM4VForCausalLM
from flatout.models.registry import load_model, resolve_model_config
from flatout.multimodal.placement import collapsed_positions, image_span
from tests.helpers.tiny_checkpoints import load_hf_reference
from tests.models.glm4v_9b_reference import (
    BOI,
    EOI,
    PLACEHOLDER,
    dense_tower,
    make_tiny_glm4v_9b_checkpoint,
)


@pytest.fixture(scope="module")
def glm4v(tmp_path_factory) -> tuple[Path, dict, object]:  # noqa: ANN001
    path, sd = make_tiny_glm4v_9b_checkpoint(tmp_path_factory.mktemp("glm4v") / "glm-4v-9b")
    return path, sd, load_hf_reference(path)  # the oracle of the text stack


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
    assert cfg.eva_vision is not None and cfg.eva_vision.placeholder_token_id == PLACEHOLDER
    span = image_span(cfg)
    assert span is not None
    ids, offsets = span.widen([7, 8, BOI, PLACEHOLDER, EOI, 9, 10], [6])
    assert ids == [7, 8, BOI] + [PLACEHOLDER] * 4 + [EOI, 9, 10] and offsets == [2]
    pos, delta = collapsed_positions(len(ids), [(2, 6)])
    assert pos == [0, 1, 2, 3, 3, 3, 3, 4, 5, 6] and delta == 7 - 10
    # two images: each takes three positions
    ids, offsets = span.widen([BOI, PLACEHOLDER, EOI, 5, BOI, PLACEHOLDER, EOI], [6, 6])
    assert offsets == [0, 7] and len(ids) == 13
    pos, delta = collapsed_positions(len(ids), [(0, 6), (7, 6)])
    assert pos == [0, 1, 1, 1, 1, 2, 3, 4, 5, 5, 5, 5, 6] and delta == 7 - 13
    with pytest.raises(ValueError, match="1 image placeholders for 2 images"):
        span.widen([BOI, PLACEHOLDER, EOI, 9], [6, 6])
    with pytest.raises(ValueError, match="0 image placeholders"):
        span.widen([BOI, PLACEHOLDER, 9], [6])


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
        span = image_span(cfg)
        assert span is not None
        ids, offsets = span.widen(prompt, [cfg.eva_vision.num_image_tokens])
        pos, _ = collapsed_positions(len(ids), [(offsets[0], cfg.eva_vision.num_image_tokens)])
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


@pytest.mark.parametrize("tp", [1, 2])
def test_int8_text_and_tower_and_their_counted_bytes(glm4v, tp: int) -> None:  # noqa: ANN001
    """--quantization int8: the text linears and the tower's parallel linears hold int8 (the
    patch conv, adapter projection, norms and embeddings stay in the model dtype); each rank
    holds exactly the bytes `flatout plan` counts; the logits with an image stay close (top-1
    equal at 12 of the 13 positions, measured)."""
    from flatout.distributed import init_tensor_parallel
    from flatout.plan import rank_tower_bytes, rank_weight_bytes

    path, _, _ = glm4v
    cfg = resolve_model_config(str(path), quantization="int8")
    try:
        for rank in range(tp):
            init_tensor_parallel(rank, tp)
            model = load_model(cfg, torch.device("cpu"))
            held = sum(p.numel() * p.element_size() for p in model.parameters())
            if rank == 0:
                assert held == rank_weight_bytes(cfg, tp)
                tower = sum(p.numel() * p.element_size() for p in model.transformer.parameters())
                assert tower == rank_tower_bytes(cfg, tp)
    finally:
        init_tensor_parallel(0, 1)
    layer = model.transformer.vision.transformer.layers[0]
    assert layer.attention.query_key_value.weight.dtype == torch.int8
    assert layer.mlp.fc2.weight.dtype == torch.int8
    assert model.transformer.vision.linear_proj.gate_up_proj.weight.dtype == torch.int8
    assert model.transformer.vision.conv.weight.dtype == torch.float32
    if tp > 1:
        return
    base = load_model(resolve_model_config(str(path)), torch.device("cpu"))
    eva = cfg.eva_vision
    assert eva is not None
    prompt = [5, 6, 7, BOI, PLACEHOLDER, EOI, 11, 12, 13, 14]
    span = image_span(cfg)
    assert span is not None
    ids, offsets = span.widen(prompt, [eva.num_image_tokens])
    pos, _ = collapsed_positions(len(ids), [(offsets[0], eva.num_image_tokens)])
    logits = []
    with torch.no_grad():
        for m in (base, model):
            meta = AttentionMetadata.for_prefill_without_cache([len(ids)])
            with forward_context(meta):
                hidden = m(torch.tensor(ids), torch.tensor(pos), m.encode_images(_images(1)))
            logits.append(m.compute_logits(hidden))
    ref, got = logits
    err = ((got - ref).norm() / ref.norm()).item()
    assert 0.01 < err < 0.06  # measured 0.044 (random tiny weights: wide per-channel ranges)
    assert (got.argmax(-1) == ref.argmax(-1)).sum() >= len(ids) - 2
