"""The image workload of `flatout bench`: synthetic screenshots, their request shape on the wire,
and the CLI's checks."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json

import httpx
import pytest
from PIL import Image

from flatout.bench import images
from flatout.bench.cli import build_requests
from flatout.bench.client import BenchRequest, Endpoint, send_request
from flatout.cli_args import add_bench_args


def decode(url: str) -> Image.Image:
    head, b64 = url.split(",", 1)
    assert head in ("data:image/png;base64", "data:image/jpeg;base64", "data:image/webp;base64")
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def test_image_size_parsing() -> None:
    assert images.ImageSpec.parse("1080x2400") == images.ImageSpec(1080, 2400, "png")
    assert images.ImageSpec.parse("64X32", "jpeg") == images.ImageSpec(64, 32, "jpeg")
    for bad in ("1080", "ax2", "0x10", "10x99999", "1x2x3"):
        with pytest.raises(ValueError, match="--image-size"):
            images.ImageSpec.parse(bad)
    with pytest.raises(ValueError, match="--image-format"):
        images.ImageSpec.parse("8x8", "gif")


def test_screenshots_are_deterministic_distinct_and_screen_like() -> None:
    spec = images.ImageSpec(1080, 2400)
    a, b = images.screenshot(spec, 0, 0), images.screenshot(spec, 0, 1)
    assert a == images.screenshot(spec, 0, 0)  # same (seed, index), same bytes
    assert a != b and a != images.screenshot(spec, 1, 0)
    img = Image.open(io.BytesIO(a))
    assert img.size == (1080, 2400) and img.mode == "RGB"
    # far from a flat colour (a few KB) and far from noise (~7.8 MB raw): measured 1.0-1.8 MB
    assert 300_000 < len(a) < 4_000_000, len(a)


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
def test_data_urls_decode_to_the_asked_size(fmt: str) -> None:
    urls = images.screenshot_urls(images.ImageSpec(96, 200, fmt), 3, seed=5)
    assert len(urls) == 3 and len(set(urls)) == 3
    for url in urls:
        assert url.startswith(f"data:image/{fmt};base64,")
        assert decode(url).size == (96, 200)


def test_unique_images_repeat_in_turn() -> None:
    urls = images.screenshot_urls(images.ImageSpec(32, 48), 5, seed=0, unique=2)
    assert urls[0] == urls[2] == urls[4] and urls[1] == urls[3] and urls[0] != urls[1]
    assert images.screenshot_urls(images.ImageSpec(32, 48), 0, seed=0) == []
    with pytest.raises(ValueError, match="--num-unique-images"):
        images.screenshot_urls(images.ImageSpec(32, 48), 2, seed=0, unique=0)


def bench_ns(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_args(parser)
    return parser.parse_args(list(argv))


class WordTokenizer:
    """Whitespace words as tokens, enough for exact prompt lengths."""

    def encode(self, text: str) -> list[int]:
        return [len(w) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join("x" * max(1, i) for i in ids)


def test_cli_attaches_images_to_chat_requests_only() -> None:
    ns = bench_ns("--api", "chat", "--num-prompts", "3", "--input-len", "5",
                  "--images-per-request", "2", "--image-size", "40x80", "--num-unique-images", "4")
    reqs = build_requests(ns, WordTokenizer())
    assert [len(r.images) for r in reqs] == [2, 2, 2]
    flat = [u for r in reqs for u in r.images]
    assert flat[0] == flat[4] and len(set(flat)) == 4  # 6 images, 4 distinct, in turn
    assert decode(flat[0]).size == (40, 80)
    one = build_requests(bench_ns("--api", "chat", "--num-prompts", "2", "--input-len", "3",
                                  "--image-size", "24x24"), WordTokenizer())
    assert [len(r.images) for r in one] == [1, 1] and one[0].images != one[1].images
    none = build_requests(bench_ns("--api", "chat", "--num-prompts", "2", "--input-len", "3"),
                          WordTokenizer())
    assert [r.images for r in none] == [[], []]
    with pytest.raises(ValueError, match="--api chat"):
        build_requests(bench_ns("--images-per-request", "1", "--num-prompts", "2"), None)
    with pytest.raises(ValueError, match=">= 1"):
        build_requests(bench_ns("--api", "chat", "--images-per-request", "0"), WordTokenizer())
    with pytest.raises(ValueError, match="random dataset"):
        build_requests(bench_ns("--api", "chat", "--images-per-request", "1", "--dataset-name",
                                "sharegpt", "--dataset-path", "x.json"), WordTokenizer())


def test_request_on_the_wire_carries_image_parts_before_the_text() -> None:
    url = images.screenshot_urls(images.ImageSpec(16, 16), 1, seed=0)[0]
    seen: list[dict] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        chunks = [{"choices": [{"index": 0, "delta": {"content": "ok"}}]},
                  {"choices": [], "usage": {"prompt_tokens": 70, "completion_tokens": 1}}]
        body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    ep = Endpoint("http://bench.test", "m", api="chat")
    req = BenchRequest(0, "what is on the screen?", 6, 1, images=[url, url])

    async def go():  # noqa: ANN202
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send_request(client, ep, req, 0.0)

    rec = asyncio.run(go())
    assert rec.success and rec.prompt_len == 70  # the server's count includes image tokens
    content = seen[0]["messages"][0]["content"]
    assert content == [{"type": "image_url", "image_url": {"url": url}},
                       {"type": "image_url", "image_url": {"url": url}},
                       {"type": "text", "text": "what is on the screen?"}]
    with pytest.raises(ValueError, match="chat API"):
        Endpoint("http://bench.test", "m").body(req)
