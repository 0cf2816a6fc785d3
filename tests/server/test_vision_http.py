"""Images over real HTTP with the openai client on a tiny GLM-4.1V: base64 PNG image_url parts,
streamed and not, the reply equal to the offline engine's on the same prompt and pixels; every
bad image input a 400 in OpenAI's shape, with the server still serving after."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image

from flatout import LLM, SamplingParams
from tests.server.server_process import ServerProcess
from tests.server.vision_checkpoint import (
    BOI_ID,
    IMAGE_ID,
    IMAGE_TOKENS,
    make_vision_server_checkpoint,
)

MODEL = "glm4v-tiny"
MAX_TOKENS = 12


def png(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vision_server_checkpoint(tmp_path_factory.mktemp("glm4v-server") / "ckpt")


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("media")
    (d / "shot.png").write_bytes(png((84, 112), 3))
    return d


@pytest.fixture(scope="module")
def server(ckpt: Path, media_dir: Path, tmp_path_factory) -> Iterator[ServerProcess]:  # noqa: ANN001
    s = ServerProcess(["--model", str(ckpt), "--served-model-name", MODEL,
                       "--max-model-len", "512", "--limit-mm-per-prompt", '{"image": 2}',
                       "--allowed-local-media-path", str(media_dir)],
                      tmp_path_factory.mktemp("glm4v-log") / "serve.log")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0)


@pytest.fixture(scope="module")
def offline(ckpt: Path) -> LLM:
    return LLM(str(ckpt), max_model_len=512)


def expected_text(llm: LLM, parts: list[str | bytes]) -> str:
    """The offline engine on the prompt the server builds: text parts and images (PNG bytes)
    joined by newlines, each image as the text <|begin_of_image|><|image|><|end_of_image|>."""
    tok = llm.get_tokenizer()
    content = "\n".join("".join(IMAGE_TOKENS) if isinstance(p, bytes) else p for p in parts)
    prompt = tok.apply_chat_template([{"role": "user", "content": content}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt, add_special_tokens=False)
    pixels = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in parts
              if isinstance(p, bytes)]
    out = llm.generate({"prompt": ids, "multi_modal_data": {"image": pixels}},
                       SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    return out[0].outputs[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_image_request_matches_the_offline_engine(client, offline, stream: bool) -> None:  # noqa: ANN001
    images = [png((112, 140), 1), png((140, 84), 2)]
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "look"}, *[image_part(data_url(b)) for b in images],
        {"type": "text", "text": "what is it?"}]}]
    want = expected_text(offline, ["look", *images, "what is it?"])
    kwargs = dict(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    if stream:
        chunks = client.chat.completions.create(stream=True, **kwargs)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = client.chat.completions.create(**kwargs)
        text = r.choices[0].message.content
        assert r.usage.prompt_tokens > 20 + 15  # the placeholders were expanded
    assert text == want and want


def test_different_image_different_reply(client) -> None:  # noqa: ANN001
    def ask(b: bytes) -> str:
        r = client.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS, temperature=0,
                                           messages=[{"role": "user", "content": [
                                               image_part(data_url(b))]}])
        return r.choices[0].message.content
    assert ask(png((112, 140), 1)) != ask(png((112, 140), 9))


def test_autoglm_request_shape(client, media_dir: Path) -> None:  # noqa: ANN001
    """System prompt, user content [image_url, text], streamed, top_p and frequency_penalty;
    here the image is a local file under --allowed-local-media-path."""
    chunks = client.chat.completions.create(
        model=MODEL, stream=True, temperature=0, top_p=0.85, frequency_penalty=0.2,
        max_tokens=MAX_TOKENS, messages=[
            {"role": "system", "content": "You operate a phone."},
            {"role": "user", "content": [image_part(str(media_dir / "shot.png")),
                                         {"type": "text", "text": "Open the settings."}]}])
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] in ("stop", "length")


BAD = {
    "not base64": ("data:image/png;base64,@@@not base64@@@", "not valid base64"),
    "not an image": (data_url(b"hello, this is text"), "not a decodable image"),
    "truncated png": (data_url(png((112, 140), 4)[:200]), "not a decodable image"),
    "not an image mime": ("data:text/plain;base64,aGVsbG8=", "data:image/"),
    "http url": ("http://127.0.0.1:9/x.png", "not fetched"),
    "file outside the allowed path": ("/etc/hostname", "outside"),
    "too many tokens": (data_url(png((28 * 24, 28 * 24), 5)), "max_model_len"),
    # the header alone decides: this one would not even decode
    "too many tokens, by the header": (data_url(png((28 * 24, 28 * 24), 5)[:200]),
                                       "max_model_len"),
    "aspect ratio": (data_url(png((28, 28 * 201), 6)), "aspect ratio"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_image_inputs_are_400(client, case: str) -> None:  # noqa: ANN001
    url, message = BAD[case]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": [image_part(url), {"type": "text", "text": "hi"}]}])
    assert message in e.value.message
    assert e.value.body["type"] == "invalid_request_error"
    assert "Traceback" not in e.value.message and "@@@" not in e.value.message


def test_too_many_images_is_400_then_the_server_still_serves(client) -> None:  # noqa: ANN001
    part = image_part(data_url(png((112, 140), 1)))
    with pytest.raises(openai.BadRequestError, match="at most 2"):
        client.chat.completions.create(model=MODEL, max_tokens=4, messages=[
            {"role": "user", "content": [part, part, part]}])
    r = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [part]}])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_image_on_a_text_model_is_400(demo_server: ServerProcess) -> None:
    c = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="EMPTY", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="image_url"):
        c.chat.completions.create(model="demo", max_tokens=4, messages=[
            {"role": "user", "content": [image_part(data_url(png((28, 28), 1)))]}])


def test_offline_chat_takes_image_parts(offline: LLM) -> None:
    """LLM.chat: image objects and data URLs are the same image; the prompt is the server's."""
    shot = png((112, 140), 1)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    greedy = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    as_object, as_url = (offline.chat([{"role": "user", "content": [
        {"type": "text", "text": "look"}, part]}], greedy)[0].outputs[0].text
        for part in ({"type": "image", "image": pixels}, image_part(data_url(shot))))
    assert as_object == as_url == expected_text(offline, ["look", shot])


# GLM-4.1V's way: the template walks the content parts and writes each image's tokens itself
PARTS_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for p in m.content %}"
    "{% if p.type == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% else %}{{ p.text }}{% endif %}{% endfor %}{% endif %}{% endfor %}<|assistant|>")


def test_openai_content_format_lets_the_template_place_images(offline: LLM) -> None:
    from flatout.server.chat import ChatRenderer
    from flatout.server.protocol import ChatMessage, chat_messages

    msgs = [ChatMessage.model_validate({"role": "user", "content": [
        image_part("data:image/png;base64,AAAA"), {"type": "text", "text": "What is it?"}]})]
    urls: list[tuple[str, str]] = []
    placeholder = "".join(IMAGE_TOKENS)
    as_parts = chat_messages(msgs, placeholder, urls, content_format="openai")
    assert as_parts[0]["content"] == [{"type": "image"}, {"type": "text", "text": "What is it?"}]
    assert urls == [("data:image/png;base64,AAAA", "messages[0].content[0].image_url")]
    as_string = chat_messages(msgs, placeholder, [], content_format="string")
    assert as_string[0]["content"] == placeholder + "\nWhat is it?"
    renderer = ChatRenderer(offline.get_tokenizer(), PARTS_TEMPLATE, "test")
    prompt = renderer.render(as_parts)
    assert prompt == f"[gMASK]<sop><|user|>\n{placeholder}What is it?<|assistant|>"
    ids = renderer.encode(prompt)
    assert ids.count(IMAGE_ID) == 1 and ids[ids.index(IMAGE_ID) - 1] == BOI_ID


def test_bench_image_workload(server: ServerProcess, ckpt: Path, tmp_path: Path) -> None:
    """`flatout bench --api chat --image-size WxH`: every request carries its own screenshot,
    and the server's prompt length counts the image tokens (5 x 4 of them at 140x112)."""
    import json

    from tests.bench.conftest import run_flatout

    out = tmp_path / "b.json"
    proc = run_flatout("bench", "--base-url", server.url, "--no-progress", "--json", str(out),
                       "--api", "chat", "--tokenizer", str(ckpt), "--image-size", "140x112",
                       "--num-prompts", "4", "--concurrency", "2", "--input-len", "16",
                       "--output-len", "4", "--no-nvml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = json.loads(out.read_text())["runs"][0]["requests"]
    assert len(records) == 4 and all(r["success"] for r in records), records
    assert all(r["output_tokens"] == 4 for r in records)
