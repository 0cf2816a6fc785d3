"""Images of chat requests: `image_url` parts into uint8 pixels, off the event loop.

Accepted sources: `data:image/...;base64,...` URLs always; local files (a path or `file://`)
only under `--allowed-local-media-path`. http(s) URLs are refused (this server fetches
nothing). Decoding runs in a thread pool (Pillow releases the GIL while it decodes), so the event
loop keeps streaming while images decode, several at once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from flatout.multimodal.image_io import (
    ImageError,
    data_url_bytes,
    decode_image,
    read_image_size,
)
from flatout.server.errors import OpenAIError

DEFAULT_MAX_IMAGES_PER_PROMPT = 8


@dataclass(frozen=True)
class ImageRef:
    url: str
    param: str  # where it is in the request, for errors: messages[i].content[j].image_url


@dataclass
class MediaPolicy:
    """Where images may come from, how many a prompt may hold, and the pool that decodes them."""

    allowed_local_media_path: Path | None = None
    max_images_per_prompt: int = DEFAULT_MAX_IMAGES_PER_PROMPT
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        min(8, os.cpu_count() or 1), thread_name_prefix="flatout-image"), repr=False)

    def image_bytes(self, ref: ImageRef) -> bytes:
        """The encoded image a URL names (OpenAIError for a source that is not allowed)."""
        url = ref.url
        if url.startswith("data:"):
            try:
                return data_url_bytes(url)
            except ImageError as e:
                raise OpenAIError(str(e), param=ref.param, code="invalid_image") from None
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https"):
            raise OpenAIError("image URLs over http(s) are not fetched by this server; send the "
                              "image as a base64 data: URL", param=ref.param,
                              code="image_url_not_allowed")
        if scheme not in ("", "file"):
            raise OpenAIError(f"image URL scheme {scheme!r} is not supported", param=ref.param,
                              code="image_url_not_allowed")
        return self._local_file(ref)

    def _local_file(self, ref: ImageRef) -> bytes:
        root = self.allowed_local_media_path
        if root is None:
            raise OpenAIError("local image files are not allowed on this server (start it with "
                              "--allowed-local-media-path DIR)", param=ref.param,
                              code="image_url_not_allowed")
        raw = unquote(urlparse(ref.url).path) if ref.url.startswith("file:") else ref.url
        path = Path(raw).resolve()
        if not path.is_relative_to(root.resolve()):
            raise OpenAIError("the image file is outside --allowed-local-media-path",
                              param=ref.param, code="image_url_not_allowed")
        try:
            return path.read_bytes()
        except OSError:
            raise OpenAIError("the image file cannot be read", param=ref.param) from None

    def read(self, ref: ImageRef) -> tuple[bytes, tuple[int, int]]:
        """The image's bytes and its (height, width) from the header (nothing decoded)."""
        data = self.image_bytes(ref)
        try:
            return data, read_image_size(data)
        except ImageError as e:  # its message quotes no path and no bytes
            raise OpenAIError(str(e), param=ref.param, code="invalid_image") from None

    def decode(self, ref: ImageRef, data: bytes) -> np.ndarray:
        try:
            return decode_image(data)
        except ImageError as e:
            raise OpenAIError(str(e), param=ref.param, code="invalid_image") from None

    async def load(
        self, refs: list[ImageRef], check_sizes: Callable[[list[tuple[int, int]]], None]
    ) -> list[np.ndarray]:
        """Every image decoded, concurrently in the pool, in order (the first error raises);
        `check_sizes` sees the (height, width) of all of them, from their headers, before any
        is decoded."""
        if len(refs) > self.max_images_per_prompt:
            raise OpenAIError(f"{len(refs)} images in one request; at most "
                              f"{self.max_images_per_prompt} are allowed",
                              param="messages", code="too_many_images")
        loop = asyncio.get_running_loop()
        read = await asyncio.gather(
            *(loop.run_in_executor(self.pool, self.read, ref) for ref in refs))
        check_sizes([size for _, size in read])
        return list(await asyncio.gather(
            *(loop.run_in_executor(self.pool, self.decode, ref, data)
              for ref, (data, _) in zip(refs, read, strict=True))))
