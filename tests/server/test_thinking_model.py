"""A thinking model behind the server: reasoning and answer arrive in separate fields, streamed
and not, whether the template opened `<think>` or the model did; LangChain's ChatOpenAI as users
write it gets the answer as its content."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from langchain_openai import ChatOpenAI

from tests.server.server_process import ServerProcess
from tests.server.thinking_checkpoint import ANSWER, REASONING, make_thinking_checkpoint

MODEL = "glm-z1-tiny"
ASK = [{"role": "user", "content": "你是谁?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("thinking")
    path = make_thinking_checkpoint(tmp / "glm-z1-tiny-ckpt")
    s = ServerProcess(["--model", str(path), "--served-model-name", MODEL,
                       "--max-model-len", "256"], tmp / "serve.log")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0)


def test_raw_output_contains_the_closing_tag(client: openai.OpenAI) -> None:
    # completions do not parse reasoning: this is what the chat endpoint has to split
    think = 4094  # <think> in the demo tokenizer
    r = client.completions.create(model=MODEL, prompt=[think], max_tokens=40, temperature=0)
    assert r.choices[0].text == f" {REASONING}</think>{ANSWER}"
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra", [{}, {"enable_thinking": True},
                                   {"enable_thinking": False},
                                   {"chat_template_kwargs": {"enable_thinking": False}}])
def test_reasoning_split_non_streamed(client: openai.OpenAI, extra: dict) -> None:
    # thinking on: the template ends the prompt with <think>, the output has only </think>;
    # off: the prompt ends with "\n" and the model opens <think> itself (one token more)
    r = client.chat.completions.create(model=MODEL, messages=ASK, n=2, temperature=0.7,
                                       extra_body=extra)
    for choice in r.choices:
        assert choice.message.content == ANSWER
        assert choice.message.model_extra["reasoning_content"] == REASONING
        assert choice.finish_reason == "stop"
    thinking_off = extra.get("enable_thinking") is False or "chat_template_kwargs" in extra
    assert r.usage.completion_tokens == 2 * (12 if thinking_off else 11)


@pytest.mark.parametrize("enable_thinking", [True, False])
def test_reasoning_split_streamed(client: openai.OpenAI, enable_thinking: bool) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ASK, stream=True, stream_options={"include_usage": True},
        extra_body={"enable_thinking": enable_thinking}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    reasoning = [d.model_extra.get("reasoning_content") or "" for d in deltas]
    content = [d.content or "" for d in deltas]
    assert "".join(reasoning) == REASONING and "".join(content) == ANSWER
    # reasoning comes first, then the answer; no tag ever reaches the client
    last_reasoning = max(i for i, r in enumerate(reasoning) if r)
    first_content = min(i for i, c in enumerate(content) if c)
    assert last_reasoning < first_content
    assert not any("think>" in x for x in reasoning + content)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens == (11 if enable_thinking else 12)


def test_return_reasoning_false_drops_it(client: openai.OpenAI) -> None:
    extra = {"return_reasoning": False}
    r = client.chat.completions.create(model=MODEL, messages=ASK, extra_body=extra)
    assert r.choices[0].message.content == ANSWER
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True,
                                                 extra_body=extra))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert not any(d.model_extra.get("reasoning_content") for d in deltas)
    assert "".join(d.content or "" for d in deltas) == ANSWER


def test_langchain_chat_openai(server: ServerProcess) -> None:
    llm = ChatOpenAI(
        model=MODEL,
        temperature=0.5,
        base_url=f"{server.url}/v1",
        api_key="EMPTY",
        extra_body={"enable_thinking": True, "return_reasoning": True},
        streaming=True,
    )
    reply = llm.invoke("你是谁?")
    assert reply.content == ANSWER
    streamed = list(llm.stream("你是谁?"))
    assert "".join(str(c.content) for c in streamed) == ANSWER
    assert len([c for c in streamed if c.content]) > 1  # really streamed, token by token
