"""Each tool-call parser end to end over real HTTP: `flatout serve --enable-auto-tool-choice
--tool-call-parser NAME` on a scripted checkpoint (scripted_checkpoint.py) that writes, token by
token, replies in that parser's format: several calls in one turn, a call without arguments, text
before a call (where the format has it), malformed calls and plain text. The server parses the
model's real output; the openai SDK checks the non-streamed `message.tool_calls` and the streamed
`delta.tool_calls` against OpenAI's shape (index, id, type and name first, then the arguments in
pieces that concatenate to JSON; the finish reason alone in the last chunk). LangChain's
`ChatOpenAI.bind_tools` requests (tools with `strict` and `parameters`, each `tool_choice` form,
strict enforced by a grammar for hermes and llama3_json and a 400 for glm4 and glm45,
the assistant's `tool_calls` with `content: null`, `role: tool` results) are accepted and go back
through the chat template in the checkpoint's format."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from flatout.tokenizers.templates import GLM4_CHAT_TEMPLATE
from tests.server.scripted_checkpoint import make_scripted_checkpoint
from tests.server.server_process import ServerProcess

TWO_CALLS = [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {"zone": "CET"})]


@dataclass
class Script:
    pieces: list[str]
    content: str | None  # the content beside the calls; None: the whole text, no calls
    calls: list[tuple[str, dict[str, Any]]]


FORMATS: dict[str, dict[str, Script]] = {
    "hermes": {
        "two": Script(['<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris", ',
                       '"days": 2}}\n</tool_call>',
                       '\n<tool_call>{"name": "get_time", "arguments": ',
                       '{"zone": "CET"}}</tool_call>'], "", TWO_CALLS),
        "no_args": Script(['<tool_call>{"name": "now", ', '"arguments": {}}</tool_call>'], "",
                          [("now", {})]),
        "with_text": Script(["Let me check. ", '<tool_call>{"name": "get_weather", "arguments": '
                             '{"city": "Rome"}}</tool_call>'], "Let me check.",
                            [("get_weather", {"city": "Rome"})]),
        "malformed": Script(['<tool_call>{"name": "get_weather", ', '"arguments": </tool_call>'],
                            None, []),
        "plain": Script(["It is sunny ", "in Paris."], None, []),
    },
    "glm45": {
        "two": Script(["<tool_call>get_weather\n",
                       "<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n",
                       "<arg_key>days</arg_key>\n<arg_value>2</arg_value>\n</tool_call>",
                       "<tool_call>get_time\n<arg_key>zone</arg_key>",
                       "<arg_value>CET</arg_value></tool_call>"], "", TWO_CALLS),
        "no_args": Script(["<tool_call>now\n", "</tool_call>"], "", [("now", {})]),
        "with_text": Script(["Let me check.", "<tool_call>get_weather\n<arg_key>city</arg_key>"
                             "<arg_value>Rome</arg_value></tool_call>"], "Let me check.",
                            [("get_weather", {"city": "Rome"})]),
        "malformed": Script(["<tool_call>get weather!\n", "<arg_key>city</arg_key></tool_call>"],
                            None, []),
        "plain": Script(["It is sunny ", "in Paris."], None, []),
    },
    "glm4": {  # GLM-4-9B-chat: the second call's <|assistant|> is a special token, skipped
        "two": Script(["get_weather\n", '{"city": "Paris", ', '"days": 2}',
                       'get_time\n{"zone": ', '"CET"}'], "", TWO_CALLS),
        "no_args": Script(["now\n", "{}"], "", [("now", {})]),
        "malformed": Script(['get_weather\n{"city": ', '"Rome", '], None, []),
        "plain": Script(["It is sunny ", "in Paris."], None, []),
    },
    "llama3_json": {
        "two": Script(['<|python_tag|>{"name": "get_weather", ',
                       '"parameters": {"city": "Paris", "days": 2}}',
                       '; {"name": "get_time", ', '"parameters": {"zone": "CET"}}'], "", TWO_CALLS),
        "no_args": Script(['{"name": "now", ', '"parameters": {}}'], "", [("now", {})]),
        "malformed": Script(['{"name": "get_weather", ', '"parameters": {"city"'], None, []),
        "plain": Script(["It is sunny ", "in Paris."], None, []),
    },
}
# the checkpoint's chat template: GLM-4-9B-chat's built-in one for its format, else the demo's
TEMPLATES = {"glm4": GLM4_CHAT_TEMPLATE}

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                       "parameters": {"type": "object", "properties": {
                                           "city": {"type": "string"},
                                           "days": {"type": "integer"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "now"}},
]
MSG = [{"role": "user", "content": "Weather in Paris?"}]


@dataclass
class Served:
    parser: str
    url: str
    client: openai.OpenAI
    first: dict[str, int]  # script -> the token to bias

    def bias(self, script: str) -> dict[str, int]:
        return {str(self.first[script]): 100}


@pytest.fixture(scope="module", params=sorted(FORMATS))
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Served]:
    parser = request.param
    folder = tmp_path_factory.mktemp(f"scripted-{parser}") / "model"
    first = make_scripted_checkpoint(folder, {k: s.pieces for k, s in FORMATS[parser].items()},
                                     TEMPLATES.get(parser))
    server = ServerProcess(["--model", str(folder), "--max-model-len", "1024", "--num-kv-blocks",
                            "256", "--served-model-name", "demo", "--reasoning-parser", "none",
                            "--enable-auto-tool-choice", "--tool-call-parser", parser],
                           folder.parent / "serve.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0,
                               timeout=120)
        yield Served(parser, server.url, client, first)
    finally:
        server.stop()


def _ask(s: Served, script: str, **kw: Any) -> Any:
    return s.client.chat.completions.create(model="demo", messages=MSG, tools=TOOLS,
                                            max_tokens=16, temperature=0,
                                            logit_bias=s.bias(script), **kw)


def _streamed(s: Served, script: str) -> tuple[str, list[tuple[str, str, list[str]]], str]:
    """(content, [(id, name, argument pieces)], finish reason) of a streamed reply, checking
    each chunk against OpenAI's shape on the way."""
    content, calls, finish = "", {}, None
    for chunk in _ask(s, script, stream=True):
        (choice,) = chunk.choices
        assert finish is None, "nothing comes after the finishing chunk"
        for d in choice.delta.tool_calls or []:
            raw = d.model_dump(exclude_none=True)
            if d.index not in calls:  # a call's first delta: index, id, type, name
                assert d.index == len(calls), "calls are numbered 0, 1, … in order"
                assert set(raw) == {"index", "id", "type", "function"}, raw
                assert d.type == "function" and d.id.startswith("call_") and d.function.name
                assert d.function.arguments == ""
                calls[d.index] = (d.id, d.function.name, [])
            else:
                assert d.index == len(calls) - 1, "a call's pieces come before the next call"
                assert set(raw) == {"index", "function"} and set(raw["function"]) == {
                    "arguments"}, raw
                calls[d.index][2].append(d.function.arguments)
        content += choice.delta.content or ""
        if choice.finish_reason is not None:
            finish = choice.finish_reason
            if finish == "tool_calls":  # alone, in a chunk with an empty delta
                assert not choice.delta.content and not choice.delta.tool_calls
    assert finish is not None
    return content, list(calls.values()), finish


def _scripts(parser: str, calls: bool) -> list[str]:
    return [k for k, s in FORMATS[parser].items() if bool(s.calls) == calls]


def test_calls_non_streamed(served: Served) -> None:
    for name in _scripts(served.parser, calls=True):
        script = FORMATS[served.parser][name]
        choice = _ask(served, name).choices[0]
        assert choice.finish_reason == "tool_calls", (name, choice)
        assert choice.message.content == (script.content or None), name
        calls = choice.message.tool_calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == \
            script.calls, name
        assert all(c.type == "function" and c.id.startswith("call_") for c in calls)
        assert len({c.id for c in calls}) == len(calls)


def test_calls_streamed(served: Served) -> None:
    for name in _scripts(served.parser, calls=True):
        script = FORMATS[served.parser][name]
        content, calls, finish = _streamed(served, name)
        assert finish == "tool_calls", name
        assert content.strip() == script.content, name
        assert [(n, json.loads("".join(pieces))) for _, n, pieces in calls] == script.calls
        assert len({i for i, _, _ in calls}) == len(calls)
        if name == "two":  # long arguments come in several pieces
            assert len(calls[0][2]) > 1


def test_malformed_and_plain_output_stays_content(served: Served) -> None:
    for name in _scripts(served.parser, calls=False):
        text = "".join(FORMATS[served.parser][name].pieces)
        choice = _ask(served, name).choices[0]
        assert (choice.message.content, choice.message.tool_calls) == (text, None), name
        assert choice.finish_reason == "stop"
        assert _streamed(served, name) == (text, [], "stop"), name


def test_parallel_tool_calls_false_keeps_the_first_call(served: Served) -> None:
    choice = _ask(served, "two", parallel_tool_calls=False).choices[0]
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    assert choice.finish_reason == "tool_calls"
    calls = []
    for chunk in _ask(served, "two", parallel_tool_calls=False, stream=True):
        calls += [d.function.name for d in chunk.choices[0].delta.tool_calls or [] if d.id]
    assert calls == ["get_weather"]


def test_tool_choice_none_leaves_calls_as_text(served: Served) -> None:
    choice = _ask(served, "two", tool_choice="none").choices[0]
    assert choice.message.content == "".join(FORMATS[served.parser]["two"].pieces)
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"


STRICT_PARSERS = ("hermes", "llama3_json")  # their calls' arguments are one JSON object


class get_weather(BaseModel):  # noqa: N801 (a tool's name, as LangChain derives it)
    """Weather of a city."""

    city: str
    days: int


class get_time(BaseModel):  # noqa: N801
    """The time in a zone."""

    zone: str


def test_langchain_bind_tools_round_trip(served: Served) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    sent: list[dict[str, Any]] = []
    http = httpx.Client(event_hooks={"request": [lambda r: sent.append(json.loads(r.read()))]})
    llm = ChatOpenAI(model="demo", base_url=f"{served.url}/v1", api_key="x", temperature=0,
                     max_tokens=16, max_retries=0, timeout=120, http_client=http,
                     logit_bias=served.bias("two"))
    # strict=True: a grammar holds the calls to the schemas where the format's arguments are
    # JSON (test_tool_strict_http.py checks what it lets through; the scripted replies' long
    # tokens are not all in xgrammar 0.2.9's masks, so the round trip below goes without it);
    # the other formats refuse it, naming the field
    strict = llm.bind_tools([get_weather, get_time], tool_choice="auto", strict=True)
    if served.parser in STRICT_PARSERS:
        strict.invoke([HumanMessage("Weather in Paris?")])
        assert all(t["function"]["strict"] is True for t in sent[-1]["tools"])
    else:
        with pytest.raises(openai.BadRequestError) as e:
            strict.invoke([HumanMessage("Weather in Paris?")])
        assert e.value.body["param"] == "tools[0].function.strict", e.value.body
        assert served.parser in e.value.body["message"]
    bound = llm.bind_tools([get_weather, get_time], tool_choice="auto")
    ai = bound.invoke([HumanMessage("Weather in Paris?")])
    assert [(c["name"], c["args"]) for c in ai.tool_calls] == TWO_CALLS
    tools = sent[-1]["tools"]
    assert [t["function"]["name"] for t in tools] == ["get_weather", "get_time"]
    assert all(t["function"]["parameters"] for t in tools)

    results = [ToolMessage('{"temp": 21}', tool_call_id=ai.tool_calls[0]["id"]),
               ToolMessage("12:00", tool_call_id=ai.tool_calls[1]["id"])]
    bound.invoke([HumanMessage("Weather in Paris?"), ai, *results])
    body = sent[-1]
    assistant, tool = body["messages"][1], body["messages"][2]
    assert assistant["role"] == "assistant" and assistant["content"] is None
    assert [json.loads(c["function"]["arguments"]) for c in assistant["tool_calls"]] == [
        args for _, args in TWO_CALLS]
    assert tool == {"role": "tool", "content": '{"temp": 21}',
                    "tool_call_id": ai.tool_calls[0]["id"]}
    # the same messages go back through the template in the checkpoint's format
    ids = httpx.post(f"{served.url}/tokenize", json={"messages": body["messages"],
                                                     "tools": body["tools"]}).json()["tokens"]
    prompt = httpx.post(f"{served.url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert ('<|user|>\nWeather in Paris?<|assistant|>get_weather\n{"city": "Paris", "days": 2}'
            '<|assistant|>get_time\n{"zone": "CET"}<|observation|>\n{"temp": 21}'
            "<|observation|>\n12:00<|assistant|>") in prompt

    # the other tool_choice forms LangChain sends are accepted (the forced ones, whose grammar
    # does not depend on the parser, on one server)
    forced = [("any", "required"), ("required", "required"),
              ("get_weather", {"type": "function", "function": {"name": "get_weather"}})]
    for choice, wire in [("none", "none"), *(forced if served.parser == "glm4" else [])]:
        reply = llm.bind_tools([get_weather, get_time], tool_choice=choice).invoke("Weather?")
        assert sent[-1]["tool_choice"] == wire, choice
        if choice == "none":  # the calls stay text
            assert reply.tool_calls == [] and reply.content == "".join(
                FORMATS[served.parser]["two"].pieces)


@pytest.mark.parametrize("stream", [False, True])
def test_history_arguments_that_are_not_json_are_a_400(served: Served, stream: bool) -> None:
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": '}}
    messages = [*MSG, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "21"}]
    r = httpx.post(f"{served.url}/v1/chat/completions", timeout=60, json={
        "model": "demo", "messages": messages, "tools": TOOLS, "stream": stream})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "messages[1].tool_calls[0].function.arguments", err
    assert err["type"] == "invalid_request_error" and "not valid JSON" in err["message"]
