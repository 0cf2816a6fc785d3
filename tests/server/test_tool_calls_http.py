"""Tool calls over real HTTP with the openai SDK: `flatout serve --enable-auto-tool-choice
--tool-call-parser hermes` on a copy of the demo checkpoint whose tokenizer spells three of its
tokens as whole hermes replies, forced with logit_bias: a call with arguments (twice: two calls in
one turn), one without, and a malformed one that stays content; streamed and not."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from flatout.demo import demo_model_path
from tests.server.server_process import ServerProcess

CALL, NO_ARGS, MALFORMED = 4087, 4086, 4085
SPELLING = {
    CALL: '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
          "</tool_call>",
    NO_ARGS: '<tool_call>{"name": "now", "arguments": {}}</tool_call>',
    MALFORMED: '<tool_call>{"name": "get_weather", "arguments": </tool_call>',
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "days": {"type": "integer"}}}}}]
MSG = [{"role": "user", "content": "Weather in Paris?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    model = tmp_path_factory.mktemp("tool-model") / "demo-tools"
    shutil.copytree(demo_model_path(), model)
    tok = json.loads((model / "tokenizer.json").read_text())
    spelled = {t["content"] for t in tok["added_tokens"] if t["id"] in SPELLING}
    for t in tok["added_tokens"]:
        if t["id"] in SPELLING:
            t["content"], t["special"] = SPELLING[t["id"]], False
    (model / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["extra_special_tokens"] = [s for s in cfg["extra_special_tokens"] if s not in spelled]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    server = ServerProcess(["--model", str(model), "--max-model-len", "256", "--num-kv-blocks",
                            "256", "--served-model-name", "demo", "--reasoning-parser", "none",
                            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                           Path(model.parent / "serve.log"))
    try:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    finally:
        server.stop()


def _ask(client: openai.OpenAI, token: int, n_tokens: int = 1, **kw):  # noqa: ANN003, ANN202
    return client.chat.completions.create(
        model="demo", messages=MSG, tools=TOOLS, max_tokens=n_tokens, temperature=0,
        logit_bias={str(token): 100}, extra_body={"ignore_eos": True}, **kw)


def _streamed(client: openai.OpenAI, token: int, n_tokens: int = 1) -> tuple[str, list, str]:
    content, calls, finish = "", {}, None
    for chunk in _ask(client, token, n_tokens, stream=True):
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for d in choice.delta.tool_calls or []:
            if d.id is not None:  # a call's first delta: id, type and name, then arguments
                assert d.type == "function" and d.function.name and d.index == len(calls)
                calls[d.index] = [d.id, d.function.name, d.function.arguments or ""]
            else:
                assert d.function.name is None
                calls[d.index][2] += d.function.arguments
        finish = choice.finish_reason or finish
    return content, [(name, json.loads(args)) for _, name, args in calls.values()], finish


def test_tool_calls_non_streamed_and_streamed(client: openai.OpenAI) -> None:
    r = _ask(client, CALL, 2)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    calls = choice.message.tool_calls
    assert [(c.type, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("function", "get_weather", {"city": "Paris", "days": 2})] * 2
    assert len({c.id for c in calls}) == 2
    assert _streamed(client, CALL, 2) == (
        "", [("get_weather", {"city": "Paris", "days": 2})] * 2, "tool_calls")

    r = _ask(client, NO_ARGS)
    assert r.choices[0].message.tool_calls[0].function.arguments == "{}"
    assert _streamed(client, NO_ARGS) == ("", [("now", {})], "tool_calls")


def test_malformed_call_stays_content(client: openai.OpenAI) -> None:
    r = _ask(client, MALFORMED)
    assert r.choices[0].message.content == SPELLING[MALFORMED]
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason == "length"
    assert _streamed(client, MALFORMED) == (SPELLING[MALFORMED], [], "length")


def test_tool_choice_none_and_tool_results_round_trip(client: openai.OpenAI) -> None:
    r = _ask(client, CALL, tool_choice="none")
    assert r.choices[0].message.content == SPELLING[CALL] and not r.choices[0].message.tool_calls
    call = _ask(client, CALL).choices[0].message.tool_calls[0]
    follow_up = MSG + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    r = client.chat.completions.create(model="demo", messages=follow_up, tools=TOOLS,
                                       max_tokens=2, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > _ask(client, CALL).usage.prompt_tokens
