"""GLM-4V-9B through the whole engine (LLM API) against the dense reference of
tests/models/glm4v_9b_reference.py on a tiny random checkpoint in the shipped names: one and two
images per prompt, text-only requests batched beside them, chunked prefill splitting an image's
span, preemption, a repeated image (one encode, an encoder-cache and a prefix-cache hit), and
bad image input refused with nothing left behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flatout import LLM, SamplingParams
from flatout.engine.messages import RequestError
from tests.models.glm4v_9b_reference import (
    BOI,
    EOI,
    IMAGE_SIZE,
    PLACEHOLDER,
    DenseGLM4V9B,
    make_tiny_glm4v_9b_checkpoint,
)

NEW = 8
SLOTS = 6  # embeddings per image in the tiny config: 2 x 2 patches + boi + eoi
GREEDY = SamplingParams(max_tokens=NEW, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DenseGLM4V9B]:
    path, sd = make_tiny_glm4v_9b_checkpoint(tmp_path_factory.mktemp("4v9b") / "glm-4v-9b")
    return path, DenseGLM4V9B(path, sd)


def image(seed: int, size: int = IMAGE_SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def prompt(n_images: int, seed: int, text_len: int = 5) -> list[int]:
    """text, then per image boi, placeholder, eoi and some text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 290, (text_len,), generator=g).tolist()
    for _ in range(n_images):
        ids += [BOI, PLACEHOLDER, EOI] + torch.randint(4, 290, (3,), generator=g).tolist()
    return ids


def mm(ids: list[int], images: list[np.ndarray]) -> dict | list[int]:
    return {"prompt": ids, "multi_modal_data": {"image": images}} if images else ids


CASES = [  # (prompt seed, image seeds)
    (1, [10]),
    (2, []),  # text only, beside the image requests
    (3, [11, 12]),  # two images in one prompt
    (4, [13]),
    (5, [10]),  # the first case's image again: encoded once
]


@pytest.fixture(scope="module")
def expected(tiny) -> list[list[int]]:  # noqa: ANN001
    ref = tiny[1]
    return [ref.greedy(prompt(len(imgs), seed), [image(s) for s in imgs], NEW)
            for seed, imgs in CASES]


def check_clean(llm: LLM) -> None:
    core = llm.engine.core
    assert not core.seqs
    core.block_manager.check_integrity()
    cache = core.scheduler.encoder_cache
    cache.check_integrity()
    assert cache.num_used == 0 and not cache.num_tokens
    assert set(core.runner.encoder_outputs) <= set(cache.freed)


def test_the_reference_sees_the_images(tiny) -> None:  # noqa: ANN001
    ref = tiny[1]
    ids = prompt(1, 1)
    assert ref.greedy(ids, [image(10)], NEW) != ref.greedy(ids, [image(99)], NEW)


@pytest.mark.parametrize("engine_args", [
    dict(),  # whole prompts in one step, all requests batched
    dict(max_num_batched_tokens=8),  # chunked prefill: image spans split across steps
    dict(max_num_batched_tokens=16, num_kv_blocks=9),  # preemption
], ids=["batched", "chunked", "preempt"])
def test_greedy_equals_the_reference(tiny, expected, engine_args) -> None:  # noqa: ANN001
    llm = LLM(str(tiny[0]), block_size=4, **engine_args)
    try:
        prompts = [mm(prompt(len(imgs), seed), [image(s) for s in imgs]) for seed, imgs in CASES]
        outs = llm.generate(prompts, GREEDY)
        assert [o.outputs[0].token_ids for o in outs] == expected
        # each image span is widened to its embeddings: 3 ids -> SLOTS ids
        assert len(outs[2].prompt_token_ids) == len(prompt(2, 3)) + 2 * (SLOTS - 3)
        check_clean(llm)
        runner = llm.engine.core.runner
        if "num_kv_blocks" in engine_args:
            assert llm.engine.scheduler.num_preemptions > 0
            assert runner.num_encoded_images >= 4
        elif not engine_args:
            assert runner.num_encoded_images == 4  # the repeated image hit the encoder cache
    finally:
        llm.engine.core.shutdown()


def test_a_repeated_image_hits_both_caches(tiny) -> None:  # noqa: ANN001
    path, ref = tiny
    llm = LLM(str(path), block_size=4)
    try:
        ids = prompt(1, seed=6, text_len=9)
        first, other = image(20), image(21)
        out = llm.generate(mm(ids, [first]), GREEDY)[0]
        assert out.outputs[0].token_ids == ref.greedy(ids, [first], NEW)
        again = llm.generate(mm(ids, [first.copy()]), GREEDY)[0]
        n = len(again.prompt_token_ids)
        assert again.outputs[0].token_ids == out.outputs[0].token_ids
        assert again.num_cached_tokens == (n - 1) // 4 * 4
        assert llm.engine.core.runner.num_encoded_images == 1
        diff = llm.generate(mm(ids, [other]), GREEDY)[0]
        assert diff.outputs[0].token_ids == ref.greedy(ids, [other], NEW)
        assert diff.num_cached_tokens == 9 // 4 * 4  # only the text before boi
        assert llm.engine.core.runner.num_encoded_images == 2
        check_clean(llm)
    finally:
        llm.engine.core.shutdown()


def test_any_image_size_is_resized_to_the_square(tiny) -> None:  # noqa: ANN001
    """A non-square image is resized to S x S on the engine's device (antialiased bicubic;
    PIL's rounding differs by a level here and there, so only the shape of the work is
    compared: the same span, and an output that depends on the image)."""
    llm = LLM(str(tiny[0]), block_size=4)
    try:
        ids = prompt(1, seed=7)
        wide = np.random.default_rng(3).integers(0, 256, (30, 90, 3), dtype=np.uint8)
        out = llm.generate(mm(ids, [wide]), GREEDY)[0]
        assert len(out.prompt_token_ids) == len(ids) + SLOTS - 3
        assert len(out.outputs[0].token_ids) == NEW
        check_clean(llm)
    finally:
        llm.engine.core.shutdown()


def test_bad_image_requests_leave_nothing_behind(tiny) -> None:  # noqa: ANN001
    llm = LLM(str(tiny[0]), block_size=4, max_model_len=64)
    try:
        ids = prompt(1, seed=8)
        with pytest.raises(RequestError, match="1 image placeholders for 2 images"):
            llm.generate(mm(ids, [image(1)] * 2), GREEDY)
        with pytest.raises(RequestError, match="0 image placeholders for 1 images"):
            llm.generate(mm([5, BOI, 7, EOI], [image(1)]), GREEDY)
        with pytest.raises(RequestError, match="image 0: an image array must be"):
            llm.generate(mm(ids, [np.zeros((28, 28), np.uint8)]), GREEDY)
        with pytest.raises(RequestError, match="at most 8"):
            llm.generate(mm(prompt(9, seed=9), [image(i) for i in range(9)]), GREEDY)
        with pytest.raises(RequestError, match="max_model_len"):
            llm.generate(mm(prompt(8, seed=9), [image(i) for i in range(8)]), GREEDY)
        check_clean(llm)
        assert llm.engine.core.runner.num_encoded_images == 0
    finally:
        llm.engine.core.shutdown()
