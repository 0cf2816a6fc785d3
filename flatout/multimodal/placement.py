"""Where a vision model's images sit in its prompt (pure Python: the API process widens the
prompt, the engine core checks it and gives the image tokens their positions).

A model marks one image in the prompt with a short run of ids (`marker`) and, once the image's
token count is known, widens it to the span whose embeddings the image's encoder rows replace:

GLM-4.1V (`Glm4vForConditionalGeneration`): the template writes <|begin_of_image|> <|image|>
    <|end_of_image|>; the one <|image|> becomes grid_h * grid_w / 4 of them and only those take
    encoder rows. Positions: 3-D M-RoPE (models/glm4v.py, `mrope_positions`).
GLM-4V-9B (`ChatGLMModel` with a vision_config): the prompt writes boi, one placeholder
    (<|endoftext|>), eoi; the three become boi, 1600 placeholders, eoi, and all 1602 take the
    tower's rows (its learned boi / eoi vectors at the ends). Positions, as the checkpoint's code
    assigns them (`collapsed_positions`): boi keeps its position p, every patch embedding takes
    p + 1, eoi p + 2 and the text after it continues from p + 3: an image occupies three
    positions however many embeddings it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from flatout.config import ModelConfig


@dataclass(frozen=True)
class ImageSpan:
    """One image in a prompt: `marker` before widening; after it, `head`, `fill` repeated,
    `tail`, num_tokens ids in all (the image's encoder rows, one per id)."""

    marker: tuple[int, ...]
    fill: int
    head: tuple[int, ...] = ()
    tail: tuple[int, ...] = ()

    def tokens(self, num_tokens: int) -> list[int]:
        n = num_tokens - len(self.head) - len(self.tail)
        if n < 0:
            raise ValueError(f"an image span of {num_tokens} tokens cannot hold its "
                             f"{len(self.head) + len(self.tail)} end tokens")
        return [*self.head, *[self.fill] * n, *self.tail]

    def find(self, token_ids: Sequence[int]) -> list[int]:
        """The indices where a marker starts (non-overlapping, left to right)."""
        ids, m = list(token_ids), list(self.marker)
        out, i = [], 0
        while i + len(m) <= len(ids):
            if ids[i : i + len(m)] == m:
                out.append(i)
                i += len(m)
            else:
                i += 1
        return out

    def widen(self, token_ids: Sequence[int], num_tokens: Sequence[int]
              ) -> tuple[list[int], list[int]]:
        """The prompt with its i-th marker widened to num_tokens[i] ids, and where each image's
        span starts in it (ValueError when the markers and the images do not pair up)."""
        starts = self.find(token_ids)
        if len(starts) != len(num_tokens):
            raise ValueError(f"prompt has {len(starts)} image placeholders for "
                             f"{len(num_tokens)} images")
        ids = list(token_ids)
        out: list[int] = []
        offsets: list[int] = []
        prev = 0
        for start, n in zip(starts, num_tokens, strict=True):
            out += ids[prev:start]
            offsets.append(len(out))
            out += self.tokens(n)
            prev = start + len(self.marker)
        return out + ids[prev:], offsets

    def matches(self, token_ids: Sequence[int], offset: int, num_tokens: int) -> bool:
        """Whether the prompt holds one widened span of num_tokens ids at offset."""
        return (offset >= 0 and num_tokens >= len(self.head) + len(self.tail)
                and list(token_ids[offset : offset + num_tokens]) == self.tokens(num_tokens))


def image_span(model: ModelConfig) -> ImageSpan | None:
    """How `model` marks and widens an image in its prompt (None: it takes no images)."""
    if model.eva_vision is not None:
        eva = model.eva_vision
        return ImageSpan((eva.boi_token_id, eva.placeholder_token_id, eva.eoi_token_id),
                         eva.placeholder_token_id, (eva.boi_token_id,), (eva.eoi_token_id,))
    if model.vision is not None:
        return ImageSpan((model.vision.image_token_id,), model.vision.image_token_id)
    return None


def collapsed_positions(num_tokens: int, spans: Sequence[tuple[int, int]]
                        ) -> tuple[list[int], int]:
    """GLM-4V-9B's 1-D positions of a prompt of num_tokens ids whose images take the
    (offset, length) spans (in order, each boi .. eoi), and the delta of what follows: a token
    at index i past the prompt sits at i + delta.

    Inside a span of length n starting at position p: p, then p + 1 (n - 2 times), then p + 2;
    everywhere else one position per token."""
    positions: list[int] = []
    pos = i = 0
    for offset, n in spans:
        if offset < i or n < 2 or offset + n > num_tokens:
            raise ValueError(f"image span ({offset}, {n}) does not fit a prompt of "
                             f"{num_tokens} tokens after the previous span")
        positions += range(pos, pos + offset - i)
        pos += offset - i
        positions += [pos, *[pos + 1] * (n - 2), pos + 2]
        pos, i = pos + 3, offset + n
    positions += range(pos, pos + num_tokens - i)
    return positions, positions[-1] + 1 - num_tokens if positions else 0
