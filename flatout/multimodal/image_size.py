"""The resized size, patch grid and image-token count of an image, from its header size alone.

Pure Python (no torch, no pixels): the API process knows how many tokens an image takes before
it is decoded. Equal to transformers' Glm4vImageProcessor (`smart_resize` with num_frames =
temporal_patch_size, factor = patch_size * merge_size) for every size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_PIXELS = 112 * 112  # Glm4vImageProcessor's size["shortest_edge"]
MAX_PIXELS = 28 * 28 * 15000  # its class default size["longest_edge"]
MAX_ASPECT_RATIO = 200


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = 28,
    num_frames: int = 2,
    temporal_factor: int = 2,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) after resizing: multiples of `factor`, num_frames * h * w within
    [min_pixels, max_pixels] (scaled by one factor, aspect kept as well as rounding allows).

    Raises ValueError for an aspect ratio above 200 or a non-positive size."""
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive (got {height}x{width})")
    if num_frames < temporal_factor:
        raise ValueError(f"num_frames {num_frames} must be >= temporal_factor {temporal_factor}")
    if height < factor or width < factor:  # upscaled so the short side reaches one factor
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image aspect ratio {max(height, width) / min(height, width):.1f} exceeds "
            f"{MAX_ASPECT_RATIO}"
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass(frozen=True)
class ImageGrid:
    resized_height: int
    resized_width: int
    grid_thw: tuple[int, int, int]  # in patches, as image_grid_thw
    num_tokens: int  # <|image|> tokens: grid_h * grid_w / merge^2


def image_grid(
    height: int,
    width: int,
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> ImageGrid:
    """The resized size, grid and token count of one image of `height` x `width` pixels."""
    h, w = smart_resize(
        height, width, factor=patch_size * merge_size, num_frames=temporal_patch_size,
        temporal_factor=temporal_patch_size, min_pixels=min_pixels, max_pixels=max_pixels,
    )
    gh, gw = h // patch_size, w // patch_size
    return ImageGrid(h, w, (1, gh, gw), gh * gw // merge_size**2)
