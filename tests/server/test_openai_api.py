"""The official `openai` client against `flatout serve` on the demo model: chat and completions,
streaming and not, n, stop, seed, logprobs, usage; greedy results equal the offline engine's."""

from __future__ import annotations

import httpx
import openai
import pytest

from flatout import LLM, SamplingParams
from flatout.server.reasoning import ReasoningParser

PROMPT = "The quick brown fox jumps over the lazy dog. Then the fox"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你是谁?"}]
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
def client(demo_server) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="EMPTY", max_retries=0,
                         timeout=120)


def offline(llm: LLM, prompt: str, **kw) -> object:  # noqa: ANN003
    return llm.generate([prompt], SamplingParams(**kw))[0]


def test_completion_greedy_equals_offline(client: openai.OpenAI, llm: LLM) -> None:
    ref = offline(llm, PROMPT, temperature=0, max_tokens=32, ignore_eos=True)
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=32, temperature=0,
                                  extra_body=NO_EOS)
    assert r.object == "text_completion" and r.model == "demo"
    assert r.choices[0].text == ref.text and ref.text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == 32 == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + 32

    chunks = list(client.completions.create(
        model="demo", prompt=PROMPT, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=NO_EOS))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 32


def test_completion_token_ids_and_several_prompts(client: openai.OpenAI, llm: LLM) -> None:
    ids = llm.get_tokenizer().encode(PROMPT)
    ref = llm.generate(ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    r = client.completions.create(model="demo", prompt=[ids, ids[:5]], max_tokens=8, n=2,
                                  temperature=0, extra_body=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == ref.text
    assert r.usage.prompt_tokens == len(ids) + 5 and r.usage.completion_tokens == 4 * 8


def test_chat_greedy_equals_offline_with_reasoning_split(client: openai.OpenAI, llm: LLM) -> None:
    # with thinking on, the demo template opens <think> in the prompt, so the whole reply
    # starts as reasoning
    ref = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                   chat_template_kwargs={"enable_thinking": True})[0]
    reasoning, content = ReasoningParser("glm45").split(ref.text, opened=True)
    r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=24, temperature=0,
                                       extra_body={**NO_EOS, "enable_thinking": True})
    msg = r.choices[0].message
    assert r.object == "chat.completion" and msg.role == "assistant"
    assert msg.content == content and msg.model_extra["reasoning_content"] == reasoning
    assert r.usage.completion_tokens == 24 and r.usage.prompt_tokens == len(ref.prompt_token_ids)

    # thinking switched off (top level, as LangChain's extra_body sends it), or left at the
    # demo's default: plain text
    plain = llm.chat(CHAT, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                     chat_template_kwargs={"enable_thinking": False})[0]
    assert plain.text
    for extra in ({}, {"enable_thinking": False},
                  {"chat_template_kwargs": {"enable_thinking": False}}):
        r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=24,
                                           temperature=0, extra_body={**NO_EOS, **extra})
        assert r.choices[0].message.content == ReasoningParser("glm45").split(
            plain.text, opened=False)[1]

    # return_reasoning: false drops the reasoning, keeps the answer
    r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=24, temperature=0,
                                       extra_body={**NO_EOS, "enable_thinking": True,
                                                   "return_reasoning": False})
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})
    assert r.choices[0].message.content == content


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    kw = dict(model="demo", messages=CHAT, max_tokens=20, temperature=0,
              extra_body={**NO_EOS, "enable_thinking": False})
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.index == 0
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    with_choice = [c for c in chunks if c.choices]
    assert with_choice[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choice[:-1])
    assert all(c.id == whole.id or c.id.startswith("chatcmpl-") for c in chunks)
    assert chunks[-1].usage.model_dump()["completion_tokens"] == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_n_and_seed(client: openai.OpenAI) -> None:
    kw = dict(model="demo", prompt=PROMPT, max_tokens=12, temperature=1.0, n=2, seed=7,
              extra_body=NO_EOS)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # seeded
    assert a.choices[0].text != a.choices[1].text  # independent samples
    assert a.usage.completion_tokens == 24

    chunks = list(client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=10, n=2, stream=True, temperature=1.0,
        extra_body={**NO_EOS, "enable_thinking": False}))
    texts = {0: "", 1: ""}
    finished = set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1} and texts[0] and texts[1]


def test_stop_strings(client: openai.OpenAI, llm: LLM) -> None:
    ref = offline(llm, PROMPT, temperature=0, max_tokens=40, ignore_eos=True).text
    stop = ref[15:18]
    expected = ref[: ref.index(stop)]
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=40, temperature=0,
                                  stop=[stop], extra_body=NO_EOS)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == stop
    chunks = client.completions.create(model="demo", prompt=PROMPT, max_tokens=40,
                                       temperature=0, stop=stop, stream=True, extra_body=NO_EOS)
    streamed = [c.choices[0] for c in chunks]
    assert "".join(c.text for c in streamed) == expected
    assert streamed[-1].finish_reason == "stop"


def test_logprobs(client: openai.OpenAI, llm: LLM) -> None:
    ref = offline(llm, PROMPT, temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    r = client.completions.create(model="demo", prompt=PROMPT, max_tokens=6, temperature=0,
                                  logprobs=3, extra_body=NO_EOS)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text == ref.text
    assert lp.token_logprobs == pytest.approx([x.logprob for x in ref.outputs[0].logprobs],
                                              abs=1e-4)
    assert all(len(top) >= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])

    r = client.chat.completions.create(model="demo", messages=CHAT, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2,
                                       extra_body={**NO_EOS, "enable_thinking": False})
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for item in content:
        assert len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)  # greedy: the best
        assert bytes(item.bytes).decode() == item.token
    chunks = list(client.chat.completions.create(
        model="demo", messages=CHAT, max_tokens=5, temperature=0, logprobs=True, stream=True,
        extra_body={**NO_EOS, "enable_thinking": False}))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]


def test_models_health_version_and_aliases(demo_server, client: openai.OpenAI) -> None:  # noqa: ANN001
    ids = [m.id for m in client.models.list().data]
    assert ids == ["demo", "demo-alias"]
    r = client.completions.create(model="demo-alias", prompt="Hi", max_tokens=2)
    assert r.model == "demo-alias"
    assert httpx.get(f"{demo_server.url}/health").status_code == 200
    assert httpx.get(f"{demo_server.url}/version").json()["version"]
    banner = demo_server.output
    assert "KV cache" in banner and "concurrent sequences at max length, in float32" in banner
    assert "dtype float32" in banner and "startup" in banner
