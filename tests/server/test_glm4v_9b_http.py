"""GLM-4V-9B over real HTTP with the openai client: a tiny random checkpoint in the shipped
layout (tower `transformer.vision.*`) with the demo's tokenizer plus <|begin_of_image|> and
<|end_of_image|>; image_url parts as base64 data: URLs, streamed and not, the reply equal to the
dense reference's greedy tokens on the prompt the server builds (each image part the span
<|begin_of_image|><|endoftext|><|end_of_image|>, widened to the image's embeddings); bad input a
400 with the server serving after."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import pytest
from PIL import Image
from transformers import PreTrainedTokenizerFast

from flatout.demo import ASSETS, ENDOFTEXT_ID, STOP_TOKEN_IDS
from tests.models.glm4v_9b_reference import (
    IMAGE_SIZE,
    DenseGLM4V9B,
    make_tiny_glm4v_9b_checkpoint,
)
from tests.server.server_process import ServerProcess

MODEL = "glm-4v-9b-tiny"
MAX_TOKENS = 8
BOI_ID, EOI_ID = 4096, 4097
SPAN = "<|begin_of_image|><|endoftext|><|end_of_image|>"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DenseGLM4V9B]:
    path, sd = make_tiny_glm4v_9b_checkpoint(
        tmp_path_factory.mktemp("4v9b-server") / "glm-4v-9b", boi=BOI_ID, eoi=EOI_ID,
        vocab_size=4104, eos_token_id=STOP_TOKEN_IDS, pad_token_id=ENDOFTEXT_ID)
    tok = PreTrainedTokenizerFast.from_pretrained(str(ASSETS))
    tok.add_special_tokens({"additional_special_tokens": ["<|begin_of_image|>",
                                                          "<|end_of_image|>"]})
    assert tok.convert_tokens_to_ids(["<|begin_of_image|>", "<|end_of_image|>"]) == [BOI_ID,
                                                                                    EOI_ID]
    tok.save_pretrained(path)
    return path, DenseGLM4V9B(path, sd)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory) -> Iterator[ServerProcess]:  # noqa: ANN001
    s = ServerProcess(["--model", str(tiny[0]), "--served-model-name", MODEL,
                       "--max-model-len", "256", "--limit-mm-per-prompt", '{"image": 2}'],
                      tmp_path_factory.mktemp("4v9b-log") / "serve.log")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0)


def png(seed: int, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def image_part(data: bytes) -> dict:
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def expected_text(tiny, parts: list[str | bytes]) -> str:  # noqa: ANN001
    """The reference on the server's prompt: the parts joined by newlines, each image as its
    span text, in the checkpoint's chat template."""
    path, ref = tiny
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    content = "\n".join(SPAN if isinstance(p, bytes) else p for p in parts)
    prompt = tok.apply_chat_template([{"role": "user", "content": content}],
                                     add_generation_prompt=True, tokenize=False)
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids.count(BOI_ID) == sum(isinstance(p, bytes) for p in parts)
    images = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in parts
              if isinstance(p, bytes)]
    return tok.decode(ref.greedy(ids, images, MAX_TOKENS), skip_special_tokens=True)


@pytest.mark.parametrize("stream", [True, False])
def test_image_reply_equals_the_reference(client, tiny, stream: bool) -> None:  # noqa: ANN001
    shot = png(1)
    want = expected_text(tiny, [shot, "what is it?"])
    kwargs = dict(model=MODEL, max_tokens=MAX_TOKENS, temperature=0,
                  extra_body={"ignore_eos": True},
                  messages=[{"role": "user", "content": [image_part(shot),
                                                         {"type": "text", "text": "what is it?"}]}])
    if stream:
        chunks = client.chat.completions.create(stream=True, **kwargs)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        r = client.chat.completions.create(**kwargs)
        text = r.choices[0].message.content
        assert r.usage.prompt_tokens > 6 + 3  # the span was widened to the image's embeddings
    assert text == want and want


def test_two_images_and_a_different_image(client, tiny) -> None:  # noqa: ANN001
    a, b = png(2), png(3)
    chunks = client.chat.completions.create(
        model=MODEL, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"ignore_eos": True}, messages=[{"role": "user", "content": [
            image_part(a), {"type": "text", "text": "and"}, image_part(b)]}])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(tiny, [a, "and", b])
    assert expected_text(tiny, [a, "x"]) != expected_text(tiny, [b, "x"])


def test_bad_images_are_400_then_the_server_still_serves(client) -> None:  # noqa: ANN001
    with pytest.raises(openai.BadRequestError, match="not a decodable image"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [image_part(b"not a png at all")]}])
    with pytest.raises(openai.BadRequestError, match="at most 2"):
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": [image_part(png(1))] * 3}])
    # any size is resized to the square: a wide screenshot is served
    r = client.chat.completions.create(model=MODEL, max_tokens=2, temperature=0, messages=[
        {"role": "user", "content": [image_part(png(4, (40, 120)))]}])
    assert r.choices[0].finish_reason in ("stop", "length")


def test_offline_chat_builds_the_servers_prompt(tiny) -> None:  # noqa: ANN001
    """LLM.chat with an image object part: the same prompt and reply as over HTTP."""
    from flatout import LLM, SamplingParams

    shot = png(5)
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"))
    llm = LLM(str(tiny[0]), max_model_len=256)
    try:
        assert llm.engine.inputs.image_placeholder == SPAN
        out = llm.chat([{"role": "user", "content": [{"type": "image", "image": pixels},
                                                     {"type": "text", "text": "what is it?"}]}],
                       SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        assert out[0].outputs[0].text == expected_text(tiny, [shot, "what is it?"])
    finally:
        llm.shutdown()
