"""Synthetic screenshots for image workloads: PNGs that look like phone screens (flat bars and
panels of colour, rows of "text" strokes), different for every seed so that no two requests
share an image, and compressing as real screenshots do (tens to hundreds of KB, not MB)."""

from __future__ import annotations

import base64
import io
import random

from PIL import Image, ImageDraw


def screenshot_png(width: int, height: int, seed: int) -> bytes:
    rng = random.Random(seed)

    def colour() -> tuple[int, int, int]:
        return rng.randrange(256), rng.randrange(256), rng.randrange(256)

    img = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(img)
    bar = max(1, height // 20)
    draw.rectangle((0, 0, width - 1, bar - 1), fill=colour())  # status bar
    y = bar
    while y < height:
        bottom = min(height, y + rng.randrange(max(2, height // 30), max(3, height // 6)))
        if bottom - y > 8:
            draw.rectangle((width // 40, y, width - 1 - width // 40, bottom - 4), fill=colour())
        for line in range(y + 6, bottom - 16, 24):  # "text": dark strokes of random widths
            x0 = width // 20
            draw.rectangle((x0, line, x0 + rng.randrange(max(1, width // 2)), line + 10),
                           fill=(20, 20, 20))
        y = bottom
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def parse_size(value: str) -> tuple[int, int]:
    """'1080x2400' -> (1080, 2400) (ValueError naming the flag)."""
    try:
        w, h = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise ValueError(
            f"--image-size must be WIDTHxHEIGHT, e.g. 1080x2400 (got {value!r})") from None
    if w < 1 or h < 1:
        raise ValueError(f"--image-size must be positive (got {value!r})")
    return w, h
