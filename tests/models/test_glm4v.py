"""GLM-4.1V (Glm4vForConditionalGeneration) against transformers on a tiny random checkpoint:
vision tower, M-RoPE positions (get_rope_index), full-forward logits and greedy decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from flatout.layers.attention import AttentionMetadata, forward_context
from flatout.models.glm4v import mrope_positions
from flatout.models.registry import load_model, resolve_model_config
from tests.helpers.tiny_checkpoints import GLM4V_TOKENS, make_tiny_glm4v_checkpoint

IMG, BOI, EOI = (GLM4V_TOKENS[k] for k in ("image_token_id", "image_start_token_id",
                                           "image_end_token_id"))
TOL = 1e-4  # float32 on CPU: tower outputs and logits agree to ~1e-5


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_glm4v_checkpoint(tmp_path_factory.mktemp("glm4v"))


@pytest.fixture(scope="module")
def ours(ckpt: Path) -> torch.nn.Module:
    return load_model(resolve_model_config(str(ckpt)), torch.device("cpu"))


@pytest.fixture(scope="module")
def ref(ckpt: Path) -> transformers.Glm4vForConditionalGeneration:
    model = transformers.Glm4vForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def _processor() -> transformers.Glm4vImageProcessorPil:
    return transformers.Glm4vImageProcessorPil(
        size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 40}
    )


def _images(sizes: list[tuple[int, int]], seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _pixels(sizes: list[tuple[int, int]]) -> tuple[torch.Tensor, list[tuple[int, int, int]]]:
    out = _processor()(images=_images(sizes), return_tensors="pt")
    grids = [tuple(int(v) for v in g) for g in out["image_grid_thw"]]
    return out["pixel_values"], grids  # type: ignore[return-value]


def _prompt(grids: list[tuple[int, int, int]], seed: int = 1) -> list[int]:
    """text, then per image <boi> <image>*n <eoi> text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 290, (5,), generator=g).tolist()
    for t, h, w in grids:
        ids += [BOI] + [IMG] * (t * h * w // 4) + [EOI]
        ids += torch.randint(4, 290, (3,), generator=g).tolist()
    return ids


def _hf_rope_index(ref, ids: list[int], grids):  # noqa: ANN001, ANN202
    input_ids = torch.tensor([ids])
    types = (input_ids == IMG).int()
    return ref.model.get_rope_index(
        input_ids, types, image_grid_thw=torch.tensor(grids) if grids else None
    )


SIZES = {
    "one": [(56, 84)],
    "several": [(56, 84), (140, 56), (28 * 5, 28 * 3)],
}


@pytest.mark.parametrize("case", ["one", "several"])
@torch.no_grad()
def test_vision_tower_matches_transformers(ours, ref, case: str) -> None:
    pixels, grids = _pixels(SIZES[case])
    expected = ref.model.visual(pixels, grid_thw=torch.tensor(grids)).pooler_output
    got = ours.encode_images(pixels, grids)
    assert got.shape == expected.shape == (sum(t * h * w // 4 for t, h, w in grids), 64)
    assert (got - expected).abs().max().item() < TOL
    assert expected.abs().max().item() > 0.1  # the comparison is not of near-zeros


@pytest.mark.parametrize("case", ["text", "one", "several"])
def test_mrope_positions_match_get_rope_index(ref, case: str) -> None:
    grids = [] if case == "text" else _pixels(SIZES[case])[1]
    ids = _prompt(grids)
    positions, delta = mrope_positions(ids, grids, IMG)
    if grids:
        expected, expected_delta = _hf_rope_index(ref, ids, grids)
        assert torch.equal(positions, expected[:, 0])
        assert delta == int(expected_delta) and delta < 0
    else:
        assert torch.equal(positions, torch.arange(len(ids)).expand(3, -1))
        assert delta == 0


def test_mrope_positions_reject_mismatched_grids() -> None:
    with pytest.raises(ValueError, match="needs 6 image tokens"):
        mrope_positions([1, IMG, IMG, 2], [(1, 4, 6)], IMG)
    with pytest.raises(ValueError, match="grids given"):
        mrope_positions([1, 2], [(1, 2, 2)], IMG)


@torch.no_grad()
def _our_logits(ours, ids: list[int], pixels, grids) -> torch.Tensor:  # noqa: ANN001
    positions, _ = mrope_positions(ids, grids, IMG)
    embeds = ours.encode_images(pixels, grids) if grids else None
    with forward_context(AttentionMetadata.for_prefill_without_cache([len(ids)])):
        hidden = ours(torch.tensor(ids), positions, embeds)
    return ours.compute_logits(hidden)


@pytest.mark.parametrize("case", ["text", "one", "several"])
@torch.no_grad()
def test_prefill_logits_match_transformers(ours, ref, case: str) -> None:
    pixels, grids = _pixels(SIZES[case]) if case != "text" else (None, [])
    ids = _prompt(grids)
    kwargs = {}
    if grids:
        kwargs = dict(pixel_values=pixels, image_grid_thw=torch.tensor(grids),
                      mm_token_type_ids=(torch.tensor([ids]) == IMG).int())
    expected = ref(input_ids=torch.tensor([ids]), **kwargs).logits[0]
    got = _our_logits(ours, ids, pixels, grids)
    assert (got - expected).abs().max().item() < TOL


@torch.no_grad()
def test_images_change_the_logits(ours) -> None:
    """The image embeddings are used: other pixels, other logits."""
    pixels, grids = _pixels(SIZES["one"])
    ids = _prompt(grids)
    a = _our_logits(ours, ids, pixels, grids)
    b = _our_logits(ours, ids, pixels.flip(0), grids)
    assert (a - b).abs().max().item() > 1e-2


@pytest.mark.parametrize("case", ["one", "several"])
@torch.no_grad()
def test_greedy_decode_matches_generate(ours, ref, case: str) -> None:
    """Model-level loop: the whole sequence recomputed each step (no KV cache), decode positions
    = text position + rope delta on all three axes."""
    pixels, grids = _pixels(SIZES[case])
    ids = _prompt(grids)
    n_new = 6
    out = ref.generate(
        input_ids=torch.tensor([ids]), pixel_values=pixels, image_grid_thw=torch.tensor(grids),
        mm_token_type_ids=(torch.tensor([ids]) == IMG).int(),
        attention_mask=torch.ones(1, len(ids)),
        max_new_tokens=n_new, do_sample=False, eos_token_id=None, pad_token_id=0,
    )
    expected = out[0, len(ids):].tolist()
    prompt_pos, delta = mrope_positions(ids, grids, IMG)
    embeds = ours.encode_images(pixels, grids)
    seq = list(ids)
    for _ in range(n_new):
        decode_pos = torch.arange(len(ids), len(seq)) + delta
        positions = torch.cat([prompt_pos, decode_pos.expand(3, -1)], dim=1)
        with forward_context(AttentionMetadata.for_prefill_without_cache([len(seq)])):
            hidden = ours(torch.tensor(seq), positions, embeds)
        seq.append(int(ours.compute_logits(hidden[-1:]).argmax(-1)))
    assert seq[len(ids):] == expected


def test_presets_count_the_vision_tower() -> None:
    for name in ("glm-4.1v-9b-thinking", "autoglm-phone-9b"):
        cfg = resolve_model_config(name)
        assert cfg.architecture == "Glm4vForConditionalGeneration"
        assert cfg.vision is not None and cfg.mrope_section == (8, 12, 12)
        assert cfg.rotary_dim == 64 and cfg.head_dim == 128 and cfg.sandwich_norm
        # 24 blocks of 1536 wide + merger: 0.89 B on top of the 9.4 B text stack
        assert 0.85e9 < cfg.vision.num_params < 0.95e9
        assert cfg.num_params - cfg.vision.num_params == resolve_model_config(
            "glm-4-9b-0414").num_params


def test_param_count_matches_the_built_model(ours) -> None:
    assert sum(p.numel() for p in ours.parameters()) == ours.config.num_params


@torch.no_grad()
def test_mrope_table_is_gathered_once_per_forward(ours, monkeypatch) -> None:  # noqa: ANN001
    """The per-token M-RoPE cos|sin is built once per forward and shared by every layer (a
    layer handed the raw [3, T] positions would gather its own: one call per layer)."""
    rope = ours.model.language_model.rotary_emb
    calls = []
    real = rope.prepare
    monkeypatch.setattr(rope, "prepare", lambda p: calls.append(p.shape) or real(p))
    pixels, grids = _pixels(SIZES["one"])
    _our_logits(ours, _prompt(grids), pixels, grids)
    assert len(calls) == 1 and calls[0][0] == 3
    assert all(layer.self_attn.rotary_emb is rope for layer in ours.model.language_model.layers)
