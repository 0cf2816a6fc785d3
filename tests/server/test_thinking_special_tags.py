"""A thinking model whose tokenizer marks `<think>` and `</think>` special: with the default
skip_special_tokens the tags never reach the text, and the chat endpoint still splits the
reasoning from the answer (by the tags' ids), streamed and not."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from tests.server.server_process import ServerProcess
from tests.server.thinking_checkpoint import ANSWER, REASONING, make_thinking_checkpoint

MODEL = "glm-z1-special"
ASK = [{"role": "user", "content": "你是谁?"}]
THINK = 4094


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    tmp = tmp_path_factory.mktemp("thinking-special")
    path = make_thinking_checkpoint(tmp / "ckpt", special_tags=True)
    s = ServerProcess(["--model", str(path), "--served-model-name", MODEL,
                       "--max-model-len", "256"], tmp / "serve.log")
    try:
        yield openai.OpenAI(base_url=f"{s.url}/v1", api_key="EMPTY", max_retries=0)
    finally:
        s.stop()


def test_the_text_has_no_tags(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=[THINK], max_tokens=40, temperature=0)
    assert r.choices[0].text == f" {REASONING}{ANSWER}"  # nothing a text parser could split at


@pytest.mark.parametrize("extra", [{}, {"skip_special_tokens": True},
                                   {"skip_special_tokens": False},
                                   {"enable_thinking": False}])
def test_reasoning_split_by_id(client: openai.OpenAI, extra: dict) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0,
                                       extra_body=extra)
    msg = r.choices[0].message
    assert (msg.model_extra["reasoning_content"], msg.content) == (REASONING, ANSWER)
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, temperature=0,
                                                 stream=True, extra_body=extra))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    assert (reasoning, "".join(d.content or "" for d in deltas)) == (REASONING, ANSWER)
