"""GLM-4.1V through the whole engine (LLM API) against transformers' generate on a tiny random
checkpoint: images in the prompt, text-only requests beside them, chunked prefill splitting an
image, prefix-cache hits on a repeated image (and none for another image), preemption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from flatout import LLM, SamplingParams
from flatout.engine.messages import RequestError
from tests.helpers.tiny_checkpoints import GLM4V_TOKENS, make_tiny_glm4v_checkpoint

IMG, BOI, EOI = (GLM4V_TOKENS[k] for k in ("image_token_id", "image_start_token_id",
                                           "image_end_token_id"))
NEW = 8
# sizes that need no resize (multiples of 28 within the default pixel range), so pixel values
# are exactly the reference processor's and the tokens can be compared exactly
SIZES = [(112, 140), (140, 84), (84, 112)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_glm4v_checkpoint(tmp_path_factory.mktemp("glm4v"))


@pytest.fixture(scope="module")
def ref(ckpt: Path) -> transformers.Glm4vForConditionalGeneration:
    model = transformers.Glm4vForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def image(size: tuple[int, int], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def prompt(n_images: int, seed: int, text_len: int = 5) -> list[int]:
    """text, then per image <boi> <image> <eoi> text (one placeholder per image)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 290, (text_len,), generator=g).tolist()
    for _ in range(n_images):
        ids += [BOI, IMG, EOI] + torch.randint(4, 290, (3,), generator=g).tolist()
    return ids


@torch.no_grad()
def hf_generate(ref, ids: list[int], images: list[np.ndarray]) -> list[int]:  # noqa: ANN001
    kwargs = {}
    if images:
        proc = transformers.Glm4vImageProcessorPil()
        out = proc(images=images, return_tensors="pt")
        grids = out["image_grid_thw"]
        expanded: list[int] = []
        it = iter(grids.tolist())
        for t in ids:
            expanded += [IMG] * (int(np.prod(next(it))) // 4) if t == IMG else [t]
        ids = expanded
        kwargs = dict(pixel_values=out["pixel_values"], image_grid_thw=grids,
                      mm_token_type_ids=(torch.tensor([ids]) == IMG).int())
    gen = ref.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                       max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                       eos_token_id=None, pad_token_id=0, **kwargs)
    return gen[0, len(ids):].tolist()


GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


def mm(ids: list[int], images: list[np.ndarray]) -> dict:
    return {"prompt": ids, "multi_modal_data": {"image": images}} if images else ids


# each case: (prompt seed, images as (size index, pixel seed))
CASES = [
    (1, [(0, 10)]),
    (2, []),  # text only, beside the image requests
    (3, [(1, 11), (2, 12)]),  # two images of different sizes
    (4, [(2, 13)]),
]


@pytest.fixture(scope="module")
def expected(ref) -> list[list[int]]:  # noqa: ANN001
    out = []
    for seed, imgs in CASES:
        images = [image(SIZES[i], s) for i, s in imgs]
        out.append(hf_generate(ref, prompt(len(images), seed), images))
    return out


def case_prompts() -> list:
    return [mm(prompt(len(imgs), seed), [image(SIZES[i], s) for i, s in imgs])
            for seed, imgs in CASES]


def check_clean(llm: LLM) -> None:
    core = llm.engine.core
    assert not core.seqs
    core.block_manager.check_integrity()
    cache = core.scheduler.encoder_cache
    cache.check_integrity()
    assert cache.num_used == 0 and not cache.num_tokens  # nothing left behind
    assert set(core.runner.encoder_outputs) <= set(cache.freed)  # dropped with the next step


@pytest.mark.parametrize("engine_args", [
    dict(),  # whole prompts in one step
    dict(max_num_batched_tokens=16),  # chunked prefill: images split across steps
    dict(max_num_batched_tokens=24, num_kv_blocks=10),  # preemption
], ids=["batched", "chunked", "preempt"])
def test_greedy_equals_transformers(ckpt: Path, expected, engine_args) -> None:  # noqa: ANN001
    llm = LLM(str(ckpt), block_size=8, **engine_args)
    outs = llm.generate(case_prompts(), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    check_clean(llm)
    runner = llm.engine.core.runner
    if "num_kv_blocks" in engine_args:
        assert llm.engine.scheduler.num_preemptions > 0
        assert runner.num_encoded_images >= 4  # recomputed after preemption, at least once each
    else:
        assert runner.num_encoded_images == 4  # once per image, chunks or not


def test_prefix_cache_hit_on_the_same_image_only(ckpt: Path, ref) -> None:  # noqa: ANN001
    llm = LLM(str(ckpt), block_size=4)
    ids = prompt(1, seed=5, text_len=9)
    first, other = image(SIZES[0], 20), image(SIZES[0], 21)
    want_first, want_other = hf_generate(ref, ids, [first]), hf_generate(ref, ids, [other])
    assert want_first != want_other  # the image decides the output
    out = llm.generate(mm(ids, [first]), GREEDY)[0]
    assert out.outputs[0].token_ids == want_first
    # same text, same image: every full block of the prompt is a hit, the image not re-encoded
    again = llm.generate(mm(ids, [first.copy()]), GREEDY)[0]
    n = len(again.prompt_token_ids)
    assert again.outputs[0].token_ids == want_first
    assert again.num_cached_tokens == (n - 1) // 4 * 4
    assert llm.engine.core.runner.num_encoded_images == 1
    # same tokens, another image: only the blocks before the image hit
    diff = llm.generate(mm(ids, [other]), GREEDY)[0]
    assert diff.outputs[0].token_ids == want_other
    assert diff.num_cached_tokens == 9 // 4 * 4  # the 9 text tokens before <boi>
    assert llm.engine.core.runner.num_encoded_images == 2
    check_clean(llm)


def test_bad_image_requests_leave_nothing_behind(ckpt: Path) -> None:
    llm = LLM(str(ckpt), block_size=4)
    ids = prompt(1, seed=6)
    with pytest.raises(RequestError, match="1 image placeholders for 2 images"):
        llm.generate(mm(ids, [image(SIZES[0], 1)] * 2), GREEDY)
    with pytest.raises(RequestError, match="image 0: an image array must be"):
        llm.generate(mm(ids, [np.zeros((28, 28), np.uint8)]), GREEDY)
    with pytest.raises(RequestError, match="aspect ratio"):
        llm.generate(mm(ids, [np.zeros((28, 28 * 201, 3), np.uint8)]), GREEDY)
    with pytest.raises(RequestError, match="at most 8"):
        llm.generate(mm(prompt(9, seed=7), [image(SIZES[2], i) for i in range(9)]), GREEDY)
    with pytest.raises(RequestError, match="max_model_len"):
        big = np.zeros((28 * 40, 28 * 40, 3), np.uint8)  # 400 image tokens > 512 - max_tokens
        llm.generate(mm(ids, [big]), SamplingParams(max_tokens=200))
    check_clean(llm)
    assert llm.engine.core.runner.num_encoded_images == 0
