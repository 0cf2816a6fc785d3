"""Grids and token counts equal transformers' Glm4vImageProcessor for any image size."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import transformers
from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as hf_smart_resize

from flatout.multimodal.image_size import image_grid, smart_resize


def _sizes(n: int = 50, seed: int = 0) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    sizes = [(1080, 2400), (2400, 1080), (28, 28), (1, 1), (27, 5000), (10, 1999), (3000, 16),
             (112, 112), (111, 113), (4000, 4000)]  # screenshots, tiny, extreme aspect ratios
    while len(sizes) < n:
        h = int(10 ** rng.uniform(0.5, 3.6))
        w = int(10 ** rng.uniform(0.5, 3.6))
        if max(h, w) / min(h, w) < 150:
            sizes.append((h, w))
    return sizes


SIZE_LIMITS = [(112 * 112, 28 * 28 * 15000), (12544, 9633792), (28 * 28, 28 * 28 * 64)]


@pytest.mark.parametrize(("min_pixels", "max_pixels"), SIZE_LIMITS)
def test_grid_equals_the_processor_on_random_sizes(min_pixels: int, max_pixels: int) -> None:
    proc = transformers.Glm4vImageProcessorPil(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels}
    )
    checked = 0
    for h, w in _sizes():
        try:
            expected = hf_smart_resize(
                2, h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels
            )
        except ValueError:
            with pytest.raises(ValueError):
                smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
            continue
        g = image_grid(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
        assert (g.resized_height, g.resized_width) == expected, (h, w)
        if h * w <= 800 * 800:  # the processor itself on the smaller images (speed)
            img = np.zeros((h, w, 3), dtype=np.uint8)
            out = proc(images=[img], return_tensors="pt", input_data_format="channels_last")
            assert tuple(out["image_grid_thw"][0].tolist()) == g.grid_thw, (h, w)
            assert out["pixel_values"].shape[0] // 4 == g.num_tokens
        checked += 1
    assert checked >= 45


def test_aspect_ratio_above_200_is_refused() -> None:
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(28, 28 * 201)
    with pytest.raises(ValueError, match="positive"):
        smart_resize(0, 100)


def test_screenshot_grid() -> None:
    """AutoGLM's max_pixels 5e6 on a 1080x2400 screenshot: grid 168x74, 3,108 tokens (issue 14)."""
    g = image_grid(2400, 1080, max_pixels=5_000_000)
    assert g.grid_thw == (1, 168, 74) and g.num_tokens == 3108
    assert torch.Size([1, 168, 74]) == torch.Size(g.grid_thw)
