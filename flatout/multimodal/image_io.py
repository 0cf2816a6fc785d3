"""Images from bytes or Python objects into uint8 pixels, in the API process (no torch).

The header alone gives the size (and so, through image_size.py, the token count) before any
pixel is decoded; decoding refuses images over a pixel limit before it starts (a small file
can declare a huge image) and truncated or corrupt files. Pixels leave as a [H, W, 3] uint8
numpy array with a content hash of those pixels and the size they will be resized to.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

FORMATS = ("PNG", "JPEG", "WEBP")
MAX_DECODE_PIXELS = 64_000_000  # larger images are refused before decoding


class ImageError(ValueError):
    """Bytes that are not a usable image (the message is safe to show the client)."""


def data_url_bytes(url: str) -> bytes:
    """The image bytes of a `data:image/...;base64,...` URL (ImageError otherwise)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise ImageError("an image data URL must be data:image/...;base64,...")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("the image data URL is not valid base64") from None


def read_image_size(data: bytes) -> tuple[int, int]:
    """(height, width) from the image's header alone (ImageError if it is not an image)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in FORMATS:
                raise ImageError(f"image format {img.format} is not one of {', '.join(FORMATS)}")
            width, height = img.size
            return height, width
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise ImageError(f"not a decodable image ({type(e).__name__})") from None


def decode_image(data: bytes, max_pixels: int = MAX_DECODE_PIXELS) -> np.ndarray:
    """PNG/JPEG/WebP bytes -> [H, W, 3] uint8 RGB (ImageError if not one of them, truncated,
    corrupt or larger than `max_pixels`)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in FORMATS:
                raise ImageError(f"image format {img.format} is not one of {', '.join(FORMATS)}")
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(f"image of {width}x{height} pixels exceeds the limit of "
                                 f"{max_pixels} pixels")
            img.load()
            return to_rgb_array(img)
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
            Image.DecompressionBombError) as e:
        raise ImageError(f"not a decodable image ({type(e).__name__})") from None


def to_rgb_array(image: Any) -> np.ndarray:
    """A PIL image or an [H, W, 3] uint8 array as a contiguous [H, W, 3] uint8 RGB array."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.array(image, dtype=np.uint8)  # a writable copy (torch reads it in place)
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ImageError(f"an image array must be [H, W, 3] uint8 (got {image.shape} "
                             f"{image.dtype})")
        return image if image.flags.c_contiguous and image.flags.writeable else image.copy()
    raise ImageError(f"an image must be a PIL image or a uint8 array (got {type(image).__name__})")


def content_hash(pixels: np.ndarray, resized: tuple[int, int]) -> bytes:
    """Names the encoder's output for these pixels at this resized size."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.asarray(pixels.shape + resized, dtype=np.int64).tobytes())
    h.update(pixels.tobytes())
    return h.digest()
