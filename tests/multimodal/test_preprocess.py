"""Torch preprocessing (the GPU path) against Glm4vImageProcessor's pixel_values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from flatout.multimodal.image_size import image_grid
from flatout.multimodal.preprocess import preprocess_image

MIN_PIXELS, MAX_PIXELS = 28 * 28, 28 * 28 * 200


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth gradient plus noise: resampling matters, as in photos and screenshots."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [(56, 84), (300, 200), (1000, 90), (97, 613), (420, 420)])
def test_pixel_values_match_the_processor(size: tuple[int, int]) -> None:
    h, w = size
    img = _image(h, w)
    proc = transformers.Glm4vImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    )
    expected = proc(images=[img], return_tensors="pt")["pixel_values"]
    g = image_grid(h, w, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    got = preprocess_image(torch.from_numpy(img), (g.resized_height, g.resized_width))
    assert got.shape == expected.shape
    diff = (got - expected).abs()
    # PIL's and torch's antialiased bicubic round differently: measured ~20 % of values one or
    # more uint8 levels off (one level = 1/255/std ~ 0.015 normalised), mean 0.0033, max 0.12
    # (~8 levels, at sharp noise); patch order and normalisation are exact (test below)
    assert diff.mean().item() < 0.005
    assert diff.max().item() < 0.15


def test_unresized_image_is_exact() -> None:
    img = _image(56, 112)
    proc = transformers.Glm4vImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}
    )
    expected = proc(images=[img], return_tensors="pt")["pixel_values"]
    got = preprocess_image(torch.from_numpy(img), (56, 112))
    assert (got - expected).abs().max().item() < 1e-5
