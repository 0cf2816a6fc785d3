"""Prompts into token ids, checked against the model and the KV cache before anything is queued.

Runs beside the caller (the offline LLM, or the server's API process); imports no torch."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from flatout.config import ModelConfig
from flatout.engine.batch import prompt_layout
from flatout.engine.messages import MultiModalItem, RequestError
from flatout.multimodal.image_io import ImageError, content_hash, to_rgb_array
from flatout.multimodal.image_size import MAX_PIXELS, MIN_PIXELS, ImageGrid, image_grid
from flatout.multimodal.placement import ImageSpan, image_span
from flatout.sampling_params import SamplingParams

DEFAULT_MAX_IMAGES_PER_PROMPT = 8
logger = logging.getLogger(__name__)


@dataclass
class ProcessedPrompt:
    """A prompt tokenized and checked, ready to queue."""

    text: str | None  # as given, when it was text
    token_ids: list[int]
    max_tokens: int  # resolved: the request's, or what max_model_len (and the KV cache) leave
    mm_items: list[MultiModalItem] = field(default_factory=list)


class InputProcessor:
    """Tokenizes and validates prompts against the model and the KV cache (no GPU work)."""

    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Any,
        cache_tokens: int,
        *,
        max_images_per_prompt: int = DEFAULT_MAX_IMAGES_PER_PROMPT,
        min_pixels: int = MIN_PIXELS,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        """max_images_per_prompt, min_pixels, max_pixels: the image limits (vision models):
        images per prompt, and the pixel range images are resized into (smart_resize)."""
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.cache_tokens = cache_tokens
        self.max_images_per_prompt = max_images_per_prompt
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        # a KV cache smaller than max_model_len: requests that leave max_tokens unset get what the
        # cache leaves rather than what max_model_len leaves (so they are served, not refused)
        self.default_limit = min(model_config.max_model_len, cache_tokens)
        if cache_tokens < model_config.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, fewer than max_model_len (%d): one sequence can "
                "use at most %d tokens, and requests without max_tokens get what that leaves",
                cache_tokens, model_config.max_model_len, cache_tokens)
        eos = list(model_config.eos_token_ids)
        if tokenizer is not None:
            from flatout.tokenizers import stop_token_ids

            eos += stop_token_ids(tokenizer, model_config.tokenizer)
        # GLM chat models end a turn with any of three tokens; all of them stop generation
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))

    @property
    def image_placeholder(self) -> str | None:
        """The prompt text of one image (None: the model takes no images, or its tokenizer does
        not spell them as single tokens): GLM-4.1V's <|begin_of_image|><|image|><|end_of_image|>,
        GLM-4V-9B's <|begin_of_image|><|endoftext|><|end_of_image|>."""
        span, tok = image_span(self.model_config), self.tokenizer
        if span is None or tok is None:
            return None
        vision = self.model_config.vision
        ids = list(span.marker)
        if vision is not None:  # the template's own boi / eoi around the one <|image|>
            ids = [vision.image_start_token_id, *ids, vision.image_end_token_id]
        text = "".join(tok.convert_ids_to_tokens(ids))
        if list(tok.encode(text, add_special_tokens=False)) != ids:
            return None
        return text

    def encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: pass prompts as token ids")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise RequestError("prompt must be a string or a list of token ids")
        return None, list(prompt)

    def process(
        self, prompt: str | list[int], params: SamplingParams, images: list[Any] | None = None
    ) -> ProcessedPrompt:
        """Tokenize and validate one prompt (raises RequestError). With `images` (PIL images
        or [H, W, 3] uint8 arrays, in prompt order), each image placeholder of the prompt is
        widened to its image's token count (multimodal/placement.py)."""
        text, ids = self.encode(prompt)
        items: list[MultiModalItem] = []
        if images:
            ids, items = self.expand_images(ids, images)
        return ProcessedPrompt(text, ids, self.validate(ids, params), items)

    def expand_images(
        self, token_ids: list[int], images: list[Any]
    ) -> tuple[list[int], list[MultiModalItem]]:
        """The prompt with each image's placeholder widened to the image's token count (as
        multimodal/placement.py describes), and the images as engine items (RequestError for a
        text-only model, too many images, a placeholder count that does not match, or an
        unusable image)."""
        span = self._image_span()
        if len(images) > self.max_images_per_prompt:
            raise RequestError(f"{len(images)} images in one prompt; at most "
                               f"{self.max_images_per_prompt} are allowed")
        n_placeholders = len(span.find(token_ids))
        if n_placeholders != len(images):
            raise RequestError(f"prompt has {n_placeholders} image placeholders for "
                               f"{len(images)} images")
        pixels, grids = [], []
        for index, image in enumerate(images):
            try:
                pixels.append(to_rgb_array(image))
            except ImageError as e:
                raise RequestError(f"image {index}: {e}") from None
            grids.append(self.image_grid(pixels[-1].shape[0], pixels[-1].shape[1], index))
        try:
            out, offsets = span.widen(token_ids, [g.num_tokens for g in grids])
        except ValueError as e:
            raise RequestError(str(e)) from None
        items = []
        for offset, grid, px in zip(offsets, grids, pixels, strict=True):
            resized = (grid.resized_height, grid.resized_width)
            items.append(MultiModalItem(offset, grid.num_tokens, grid.grid_thw, resized,
                                        content_hash(px, resized), px))
        return out, items

    def _image_span(self) -> ImageSpan:
        span = image_span(self.model_config)
        if span is None:
            raise RequestError(f"this model ({self.model_config.architecture}) takes no images")
        return span

    def image_grid(self, height: int, width: int, index: int = 0) -> ImageGrid:
        """An image's resized size, grid and token count under this processor's pixel range
        (RequestError naming the image for an unusable size). GLM-4V-9B resizes every image
        to its fixed square (the aspect ratio is not kept): one grid for all."""
        eva = self.model_config.eva_vision
        if eva is not None:
            if height <= 0 or width <= 0:
                raise RequestError(f"image {index}: image size must be positive (got "
                                   f"{height}x{width})")
            s = eva.image_size
            return ImageGrid(s, s, (1, eva.grid, eva.grid), eva.num_image_tokens)
        vision = self.model_config.vision
        if vision is None:
            raise RequestError(f"this model ({self.model_config.architecture}) takes no images")
        try:
            return image_grid(height, width, patch_size=vision.patch_size,
                              merge_size=vision.spatial_merge_size,
                              temporal_patch_size=vision.temporal_patch_size,
                              min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        except ValueError as e:
            raise RequestError(f"image {index}: {e}") from None

    def check_image_sizes(self, token_ids: list[int], sizes: list[tuple[int, int]],
                          params: SamplingParams) -> None:
        """Before any pixel is decoded: the prompt with images of these (height, width) sizes
        (from their headers) fits (RequestError otherwise, as `validate`)."""
        marker = len(self._image_span().marker)
        n = sum(self.image_grid(h, w, i).num_tokens for i, (h, w) in enumerate(sizes))
        self.validate(token_ids + [token_ids[0]] * (n - marker * len(sizes)), params)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request can ever be served; return its resolved max_tokens."""
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("prompt is empty")
        try:  # a prefix-LM prompt (ChatGLM-6B) must mark its context and generated span
            prompt_layout(self.model_config, prompt_token_ids)
        except ValueError as e:
            raise RequestError(str(e)) from None
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        params.check_token_ids(vocab)
        limit = self.model_config.max_model_len
        if n >= limit:
            raise RequestError(
                f"prompt has {n} tokens; this model's max_model_len is {limit} "
                f"(the prompt plus at least one generated token must fit)"
            )
        if params.max_tokens is None and n >= self.default_limit:
            raise RequestError(
                f"prompt has {n} tokens; the KV cache holds {self.cache_tokens} tokens "
                f"(the prompt plus at least one generated token must fit)"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.default_limit - n
        if n + max_tokens > limit:
            raise RequestError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds "
                f"max_model_len ({limit}); lower max_tokens to at most {limit - n}"
            )
        if n + max_tokens > self.cache_tokens:
            raise RequestError(
                f"prompt + max_tokens ({n + max_tokens} tokens) exceeds the whole KV cache "
                f"({self.cache_tokens} tokens)"
            )
        return max_tokens


def load_tokenizer_for(model_config: ModelConfig) -> Any:
    if model_config.tokenizer is None:
        return None
    from flatout.tokenizers import load_tokenizer

    return load_tokenizer(model_config.tokenizer)
