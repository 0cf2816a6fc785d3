"""Synthetic screenshots for the image workload: what an agent loop sends (AutoGLM-Phone reads a
phone screen each turn), as `data:` URLs ready for OpenAI `image_url` content parts.

Each image is deterministic in (seed, index): a light background, a status bar, rows of
"cards" with text lines in varied colours and some photo-like cards (smooth colour plus grain), so
PNG compresses about as a real UI screenshot does (hundreds of KB at 1080x2400: far from a flat
colour, far from noise) and every image differs (no prefix-cache hits between
requests unless asked for with `unique`). Encoding happens before the run, never on the clock.
"""

from __future__ import annotations

import base64
import io
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class ImageSpec:
    width: int
    height: int
    fmt: str = "png"  # png | jpeg | webp

    @classmethod
    def parse(cls, size: str, fmt: str = "png") -> ImageSpec:
        """`WxH` as in `--image-size 1080x2400`."""
        try:
            w, h = (int(v) for v in size.lower().split("x"))
        except ValueError:
            raise ValueError(
                f"--image-size must be WIDTHxHEIGHT, e.g. 1080x2400 (got {size!r})"
            ) from None
        if not (1 <= w <= 16384 and 1 <= h <= 16384):
            raise ValueError(f"--image-size sides must be in [1, 16384] (got {size!r})")
        if fmt not in FORMATS:
            raise ValueError(f"--image-format must be one of {sorted(FORMATS)} (got {fmt!r})")
        return cls(w, h, fmt)


def screenshot(spec: ImageSpec, seed: int, index: int) -> bytes:
    """One encoded synthetic screenshot."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed * 1_000_003 + index)
    w, h = spec.width, spec.height
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    img = Image.new("RGB", (w, h), bg)
    draw = ImageDraw.Draw(img)
    unit = max(4, min(w, h) // 40)
    draw.rectangle((0, 0, w, 2 * unit), fill=tuple(rng.randint(0, 90) for _ in range(3)))
    y = 3 * unit
    while y < h - 2 * unit:
        card_h = rng.randint(3, 9) * unit
        colour = tuple(rng.randint(150, 250) for _ in range(3))
        bottom = min(h - unit, y + card_h)
        draw.rounded_rectangle((unit, y, w - unit, bottom), radius=unit // 2, fill=colour)
        if rng.random() < 0.35 and bottom - y > 2 * unit:  # a photo: smooth colour, fine grain
            pw, ph = w - 2 * unit, bottom - y
            small = bytes(rng.getrandbits(8) for _ in range(3 * 8 * 8))
            photo = Image.frombytes("RGB", (8, 8), small).resize((pw, ph), Image.Resampling.BICUBIC)
            grain = Image.frombytes("L", (pw, ph), rng.randbytes(pw * ph)).convert("RGB")
            img.paste(Image.blend(photo, grain, 0.15), (unit, y))
            y += card_h + unit
            continue
        line_y = y + unit
        while line_y < y + card_h - unit:
            length = rng.randint(w // 5, w - 4 * unit)
            ink = tuple(rng.randint(0, 80) for _ in range(3))
            draw.rectangle((2 * unit, line_y, 2 * unit + length, line_y + unit // 2), fill=ink)
            line_y += unit
        y += card_h + unit
    buf = io.BytesIO()
    # fast settings: the run's images are encoded up front, and decoding costs the same
    options = {"compress_level": 1} if spec.fmt == "png" else {"quality": 90}
    img.save(buf, format=FORMATS[spec.fmt], **options)
    return buf.getvalue()


def data_url(data: bytes, fmt: str) -> str:
    return f"data:image/{fmt};base64," + base64.b64encode(data).decode("ascii")


def screenshot_urls(spec: ImageSpec, count: int, seed: int, unique: int | None = None
                    ) -> list[str]:
    """`count` data URLs; with `unique`, only that many distinct images, repeated in turn (the
    same screen sent again, as an agent does between actions)."""
    if count < 0:
        raise ValueError("image count must be >= 0")
    if unique is not None and unique < 1:
        raise ValueError("--num-unique-images must be >= 1")
    distinct = count if unique is None else min(count, unique)
    # Pillow releases the GIL while it encodes: one thread per core
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        urls = list(pool.map(lambda i: data_url(screenshot(spec, seed, i), spec.fmt),
                             range(distinct)))
    return [urls[i % distinct] for i in range(count)] if distinct else []
