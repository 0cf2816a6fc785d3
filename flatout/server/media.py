"""Images of chat requests: `image_url` parts into uint8 pixels, off the event loop.

Accepted sources: `data:image/...;base64,...` URLs always; local files (a path or `file://`)
only under `--allowed-local-media-path`; http(s) URLs only from `--allowed-media-domains`, fetched
asynchronously by media_fetch.py (refused otherwise, with no connection made). Whatever the
source, the bytes go through the same header check, pixel limit and decoder. Reading and
decoding run in a thread pool (Pillow releases the GIL while it decodes), so the event loop keeps
streaming while images are fetched and decoded, several at once.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import numpy as np

from flatout.multimodal.image_io import (
    ImageError,
    data_url_bytes,
    decode_image,
    read_image_size,
)
from flatout.server.errors import OpenAIError
from flatout.server.media_fetch import MediaFetcher, is_http_url

DEFAULT_MAX_IMAGES_PER_PROMPT = 8
T = TypeVar("T")


@dataclass(frozen=True)
class ImageRef:
    url: str
    param: str  # where it is in the request, for errors: messages[i].content[j].image_url


@dataclass
class MediaPolicy:
    """Where images may come from, how many a prompt may hold, and the pool that decodes them."""

    allowed_local_media_path: Path | None = None
    max_images_per_prompt: int = DEFAULT_MAX_IMAGES_PER_PROMPT
    fetcher: MediaFetcher = field(default_factory=MediaFetcher)  # http(s) URLs
    pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        min(8, os.cpu_count() or 1), thread_name_prefix="flatout-image"), repr=False)

    async def image_bytes(self, ref: ImageRef) -> bytes:
        """The encoded image a URL names: fetched (http(s)), or read in the pool (OpenAIError
        for a source that is not allowed or cannot be read)."""
        if is_http_url(ref.url):
            return await self.fetcher.fetch(ref.url, ref.param)
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.local_bytes, ref)

    def local_bytes(self, ref: ImageRef) -> bytes:
        """The encoded image of a data: URL or a local file (blocking: a file is read)."""
        url = ref.url
        if url.startswith("data:"):
            try:
                return data_url_bytes(url)
            except ImageError as e:
                raise OpenAIError(str(e), param=ref.param, code="invalid_image") from None
        scheme = urlparse(url).scheme.lower()
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

    async def read(self, ref: ImageRef) -> tuple[bytes, tuple[int, int]]:
        """The image's bytes and its (height, width) from the header (nothing decoded)."""
        data = await self.image_bytes(ref)
        loop = asyncio.get_running_loop()
        return data, await loop.run_in_executor(self.pool, self.size, ref, data)

    def size(self, ref: ImageRef, data: bytes) -> tuple[int, int]:
        try:
            return read_image_size(data)
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
        is decoded. On the first error the fetches and reads still running are cancelled."""
        if len(refs) > self.max_images_per_prompt:
            raise OpenAIError(f"{len(refs)} images in one request; at most "
                              f"{self.max_images_per_prompt} are allowed",
                              param="messages", code="too_many_images")
        read = await first_error_cancels([self.read(ref) for ref in refs])
        loop = asyncio.get_running_loop()
        check_sizes([size for _, size in read])
        return list(await asyncio.gather(
            *(loop.run_in_executor(self.pool, self.decode, ref, data)
              for ref, (data, _) in zip(refs, read, strict=True))))


async def first_error_cancels(coros: list[Coroutine[Any, Any, T]]) -> list[T]:
    """The coroutines' results, run concurrently, in order; the first to raise cancels the
    others (awaited until they are done) and its exception propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        pending = [t for t in tasks if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending)
