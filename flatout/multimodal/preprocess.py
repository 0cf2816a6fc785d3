"""GLM-4.1V (and GLM-4V-9B: `preprocess_fixed_size`) image preprocessing in torch, so the engine
core can run it on the GPU.

uint8 pixels [H, W, 3] -> pixel_values [grid_h * grid_w, 1176] float32, as Glm4vImageProcessor:
bicubic resize to the smart_resize size (antialiased, rounded back to uint8 levels as PIL's resize
returns uint8), rescale 1/255, normalize with the CLIP mean/std, duplicate along the temporal
axis, patches ordered 2x2 merge block by block (row-major), each patch (C, T, 14, 14).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess_image(
    image: torch.Tensor,  # [H, W, 3] uint8, on any device
    resized: tuple[int, int],  # (height, width) from image_size.smart_resize
    *,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> torch.Tensor:  # [grid_h * grid_w, 3 * T * P * P] float32
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a [H, W, 3] uint8 image (got {tuple(image.shape)} "
                         f"{image.dtype})")
    h, w = resized
    x = image.permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    if (h, w) != tuple(image.shape[:2]):
        x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std  # [1, 3, h, w]
    p, m = patch_size, merge_size
    gh, gw = h // p, w // p
    x = x.view(3, gh // m, m, p, gw // m, m, p)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, P, P]
    x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, temporal_patch_size, -1, -1)
    return x.reshape(gh * gw, 3 * temporal_patch_size * p * p)


def preprocess_fixed_size(
    image: torch.Tensor,  # [H, W, 3] uint8, on any device
    size: int = 1120,
) -> torch.Tensor:  # [3, size, size] float32
    """GLM-4V-9B's preprocessing: bicubic resize to size x size (the aspect ratio is not kept;
    antialiased and rounded to uint8 levels, as PIL's resize), rescale 1/255, CLIP mean/std."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a [H, W, 3] uint8 image (got {tuple(image.shape)} "
                         f"{image.dtype})")
    x = image.permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    if tuple(image.shape[:2]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                          antialias=True).round().clamp(0, 255)
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return ((x / 255.0 - mean) / std)[0]
