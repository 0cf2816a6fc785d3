"""Image spans in prompts (multimodal/placement.py) for both GLM vision layouts, and GLM-4V-9B's
collapsed positions, as the checkpoints' own code places them."""

from __future__ import annotations

import pytest

from flatout.models.registry import resolve_model_config
from flatout.multimodal.placement import ImageSpan, collapsed_positions, image_span


def test_each_model_marks_its_images() -> None:
    v9b = image_span(resolve_model_config("glm-4v-9b", load_format="dummy"))
    assert v9b == ImageSpan((151339, 151329, 151340), 151329, (151339,), (151340,))
    v41 = image_span(resolve_model_config("glm-4.1v-9b-thinking", load_format="dummy"))
    assert v41 == ImageSpan((151343,), 151343)
    assert image_span(resolve_model_config("glm-4-9b", load_format="dummy")) is None


def test_glm41v_repeats_the_image_token_only() -> None:
    span = ImageSpan((9,), 9)
    ids, offsets = span.widen([1, 8, 9, 7, 1, 8, 9, 7], [3, 2])
    assert ids == [1, 8, 9, 9, 9, 7, 1, 8, 9, 9, 7] and offsets == [2, 8]
    assert span.matches(ids, 2, 3) and span.matches(ids, 8, 2)
    assert not span.matches(ids, 1, 3) and not span.matches(ids, 8, 3)


def test_glm4v_9b_keeps_its_ends() -> None:
    span = ImageSpan((5, 0, 6), 0, (5,), (6,))
    assert span.tokens(5) == [5, 0, 0, 0, 6]
    ids, offsets = span.widen([5, 0, 6, 5, 6, 4], [5])  # a bare boi, eoi pair is no image
    assert ids == [5, 0, 0, 0, 6, 5, 6, 4] and offsets == [0]
    assert span.matches(ids, 0, 5) and not span.matches(ids, 0, 4)
    with pytest.raises(ValueError, match="cannot hold"):
        span.tokens(1)


def test_collapsed_positions() -> None:
    # text, an image of 6 rows, text: the image takes three positions
    assert collapsed_positions(9, [(1, 6)]) == ([0, 1, 2, 2, 2, 2, 3, 4, 5], 6 - 9)
    assert collapsed_positions(3, []) == ([0, 1, 2], 0)
    # back to back
    pos, delta = collapsed_positions(8, [(0, 4), (4, 4)])
    assert pos == [0, 1, 1, 2, 3, 4, 4, 5] and delta == 6 - 8
    with pytest.raises(ValueError, match="does not fit"):
        collapsed_positions(8, [(0, 4), (2, 4)])
    with pytest.raises(ValueError, match="does not fit"):
        collapsed_positions(5, [(2, 4)])
