"""GLM-4V-9B's fixed-size preprocessing (torch, the GPU path) against PIL's bicubic resize to a
square plus the CLIP normalisation, as the checkpoint's image transform does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flatout.multimodal.preprocess import CLIP_MEAN, CLIP_STD, preprocess_fixed_size
from tests.multimodal.test_preprocess import _image


def _pil_reference(img: np.ndarray, size: int) -> torch.Tensor:
    resized = np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC))
    x = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255.0
    return (x - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]


@pytest.mark.parametrize("shape", [(300, 200), (90, 1000), (140, 140), (57, 30)])
def test_square_resize_and_normalisation_match_pil(shape: tuple[int, int]) -> None:
    img = _image(*shape)
    got = preprocess_fixed_size(torch.from_numpy(img), size=112)
    expected = _pil_reference(img, 112)
    assert got.shape == (3, 112, 112)
    diff = (got - expected).abs()
    # PIL and torch round their antialiased bicubic differently (see test_preprocess.py)
    assert diff.mean().item() < 0.006
    assert diff.max().item() < 0.2


def test_an_image_of_the_right_size_is_only_normalised() -> None:
    img = _image(112, 112)
    got = preprocess_fixed_size(torch.from_numpy(img), size=112)
    assert (got - _pil_reference(img, 112)).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="uint8"):
        preprocess_fixed_size(torch.zeros(4, 4, 3), size=112)
