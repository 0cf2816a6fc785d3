"""Structured output over real HTTP on the random-weight demo model: whatever the weights, the
grammar forces the reply into the schema, regex or choice asked for (openai SDK's `parse` with a
pydantic model, response_format json_schema / json_object, vLLM's guided_* and
structured_outputs, tool_choice required and named, LangChain's with_structured_output), streamed
and not, with n > 1 and after a reasoning block; bad schemas and regexes are 400s naming the
field."""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

MSG = [{"role": "user", "content": "Describe a pet owner as JSON."}]
CLOSE_BRACE = 92  # the demo tokenizer's "}"
THINK_END = 4095  # the demo tokenizer's "</think>"
CLOSE_BRACKET = 60  # "]"


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    name: str = Field(min_length=1, max_length=6)
    age: int = Field(ge=0, le=30)


class Owner(BaseModel):
    vaccinated: bool
    pets: list[Pet] = Field(min_length=1, max_length=2)
    home: Literal["city", "farm"] | None


class Verdict(BaseModel):
    answer: Literal["yes", "no"]


TOOLS = [  # compact: the template renders them indented into the prompt (max_model_len 384)
    {"type": "function", "function": {"name": "weather", "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "now"}}]


@pytest.fixture(scope="module")
def client(demo_server) -> openai.OpenAI:  # noqa: ANN001
    return openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="x", max_retries=0,
                         timeout=300)


def _post(url: str, body: dict[str, object], path: str = "chat/completions") -> httpx.Response:
    return httpx.post(f"{url}/v1/{path}", json={"messages": MSG, "max_tokens": 8, **body},
                      timeout=300)


def _stream_text(client: openai.OpenAI, **kw: object) -> tuple[list[str], list[str | None]]:
    n = int(kw.get("n", 1))  # type: ignore[call-overload]
    texts, reasons = [""] * n, [None] * n
    for chunk in client.chat.completions.create(model="demo", messages=MSG, stream=True, **kw):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    return texts, reasons


def test_parse_with_a_pydantic_model_gives_valid_json_every_time(client: openai.OpenAI) -> None:
    r = client.beta.chat.completions.parse(model="demo", messages=MSG, response_format=Owner,
                                           n=3, temperature=1.0, seed=7, max_tokens=160)
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop", c.message.content
        assert isinstance(c.message.parsed, Owner)
        assert Owner.model_validate_json(c.message.content or "") == c.message.parsed


def test_json_schema_streamed_matches_the_schema(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "owner",
                                                  "schema": Owner.model_json_schema()}}
    texts, reasons = _stream_text(client, response_format=fmt, n=2, temperature=1.0, seed=3,
                                  max_tokens=160)
    assert reasons == ["stop", "stop"]
    for text in texts:
        Owner.model_validate_json(text)


def test_json_object_forces_an_object(client: openai.OpenAI) -> None:
    # the bias makes "}" the model's favourite token: free text is "}}}}", JSON mode must open
    # the object first and then ends it (and the reply) at once
    kw = {"max_tokens": 6, "temperature": 0, "logit_bias": {str(CLOSE_BRACE): 100}}
    free = client.chat.completions.create(model="demo", messages=MSG, **kw)
    assert free.choices[0].message.content.startswith("}}")
    r = client.chat.completions.create(model="demo", messages=MSG, **kw,
                                       response_format={"type": "json_object"})
    assert r.choices[0].message.content == "{}" and r.choices[0].finish_reason == "stop"


def test_guided_regex_and_choice(client: openai.OpenAI, demo_server) -> None:  # noqa: ANN001
    pattern = r"[a-c]{3}-[0-9]{2}"
    r = client.chat.completions.create(model="demo", messages=MSG, max_tokens=20, n=2,
                                       temperature=1.0, extra_body={"guided_regex": pattern})
    for c in r.choices:
        assert re.fullmatch(pattern, c.message.content), c.message.content
        assert c.finish_reason == "stop"
    texts, _ = _stream_text(client, max_tokens=20, extra_body={"guided_regex": pattern})
    assert re.fullmatch(pattern, texts[0])
    choices = ["yes", "no", "maybe later"]
    r = client.chat.completions.create(model="demo", messages=MSG, max_tokens=10, n=4,
                                       temperature=1.0, extra_body={"guided_choice": choices})
    assert {c.message.content for c in r.choices} <= set(choices)
    # vLLM's structured_outputs object, on the completions endpoint
    body = {"prompt": "Answer:", "max_tokens": 10, "structured_outputs": {"choice": choices}}
    done = _post(demo_server.url, body, "completions")
    assert done.status_code == 200, done.text
    assert done.json()["choices"][0]["text"] in choices


def _streamed_calls(client: openai.OpenAI, **kw: object) -> tuple[dict[int, list[str]], str]:
    """{index: [name, arguments]} of a streamed reply, and its finish reason (checked to come
    alone, in a last chunk with an empty delta, as OpenAI's)."""
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in client.chat.completions.create(model="demo", messages=MSG, tools=TOOLS,
                                                stream=True, **kw):
        choice = chunk.choices[0]
        assert not choice.delta.content and finish is None
        for d in choice.delta.tool_calls or []:
            if d.id is not None:
                calls[d.index] = [d.function.name, ""]
            calls[d.index][1] += d.function.arguments or ""
        if choice.finish_reason is not None:
            assert not choice.delta.tool_calls
            finish = choice.finish_reason
    assert finish is not None
    return calls, finish


def test_tool_choice_named_and_required_give_tool_calls(client: openai.OpenAI) -> None:
    # a named function: OpenAI's finish_reason is "stop" (the call was not the model's choice)
    named = {"type": "function", "function": {"name": "weather"}}
    r = client.chat.completions.create(model="demo", messages=MSG, tools=TOOLS,
                                       tool_choice=named, max_tokens=40, temperature=1.0,
                                       seed=1)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and msg.content is None
    (call,) = msg.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "weather" and args["city"] in ("Paris", "Rome")
    assert 1 <= args["days"] <= 7
    # required: a JSON array of one or more calls; the bias on "]" (which the grammar allows
    # only after a whole call) keeps the random model from listing calls up to the context
    r = client.chat.completions.create(model="demo", messages=MSG, tools=TOOLS,
                                       tool_choice="required", n=2, temperature=1.0, seed=2,
                                       logit_bias={str(CLOSE_BRACKET): 100})
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        for call in c.message.tool_calls:
            assert call.function.name in ("weather", "now") and call.id.startswith("call_")
            assert isinstance(json.loads(call.function.arguments), dict)
    # streamed: the call's id and name first, then its arguments in pieces
    calls, finish = _streamed_calls(client, tool_choice=named, max_tokens=40, seed=1,
                                    temperature=1.0)
    assert finish == "stop" and list(calls) == [0] and calls[0][0] == "weather"
    assert json.loads(calls[0][1]) == args  # the same seed: the same call as unstreamed
    # required, streamed: "tool_calls"
    calls, finish = _streamed_calls(client, tool_choice="required", temperature=1.0, seed=2,
                                    logit_bias={str(CLOSE_BRACKET): 100})
    assert finish == "tool_calls" and calls and list(calls) == list(range(len(calls)))
    assert all(name in ("weather", "now") and isinstance(json.loads(args), dict)
               for name, args in calls.values())


def test_structured_output_after_the_reasoning(client: openai.OpenAI) -> None:
    # enable_thinking opens <think> in the prompt: the grammar waits for </think> (forced here
    # by the bias; the grammar itself never allows it) and then constrains the answer
    r = client.chat.completions.create(
        model="demo", messages=MSG, max_tokens=10, temperature=0,
        logit_bias={str(THINK_END): 100},
        extra_body={"enable_thinking": True, "guided_choice": ["alpha", "beta"]})
    msg = r.choices[0].message
    assert msg.content in ("alpha", "beta") and r.choices[0].finish_reason == "stop"
    assert msg.model_extra.get("reasoning_content") == ""


def test_langchain_with_structured_output(demo_server) -> None:  # noqa: ANN001
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="demo", base_url=f"{demo_server.url}/v1", api_key="x",
                     max_tokens=160, temperature=1.0, seed=5, max_retries=0, timeout=300)
    owner = llm.with_structured_output(Owner).invoke("Describe a pet owner.")
    assert isinstance(owner, Owner)
    # as a forced tool call (tool_choice names the schema's function): a small schema, since
    # the template renders the tool into the prompt
    verdict = llm.with_structured_output(Verdict, method="function_calling").invoke("Is it?")
    assert isinstance(verdict, Verdict)


@pytest.mark.parametrize("stream", [False, True])
def test_invalid_schema_is_a_400(demo_server, stream: bool) -> None:  # noqa: ANN001
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}
    r = _post(demo_server.url, {"response_format": bad, "stream": stream})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format"
    r = _post(demo_server.url, {"guided_json": "{not json", "stream": stream})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json", r.text
    r = _post(demo_server.url, {"response_format": {"type": "xml"}, "stream": stream})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format", r.text


def test_grammar_the_engine_cannot_compile_is_a_400(demo_server) -> None:  # noqa: ANN001
    r = _post(demo_server.url, {"guided_regex": "(ab"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "guided_regex" and "parenthesis" in err["message"], err
    r = _post(demo_server.url, {"structured_outputs": {"grammar": "root ::= undefined_rule"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs", r.text
    # streamed, the response has started: the failure is the stream's error event
    r = _post(demo_server.url, {"guided_regex": "(ab", "stream": True})
    events = [json.loads(line[6:]) for line in r.text.splitlines()
              if line.startswith("data: {")]
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert events[-1]["error"]["param"] == "guided_regex", events
    ok = _post(demo_server.url, {"guided_regex": "ab"})  # the engine serves on
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "ab"


@pytest.mark.parametrize("body", [
    {"guided_regex": "a", "guided_choice": ["b"]},
    {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
    {"tool_choice": "required", "tools": TOOLS, "guided_regex": "a"},
    {"structured_outputs": {"regex": "a", "choice": ["b"]}},
    {"structured_outputs": {"whitespace_pattern": " "}},
    {"tool_choice": "required"},
    {"tool_choice": {"type": "function", "function": {"name": "missing"}}, "tools": TOOLS},
    {"guided_choice": []},
    {"guided_json": {"type": "object"}, "min_tokens": 2},
])
def test_conflicting_or_malformed_constraints_are_400s(demo_server, body) -> None:  # noqa: ANN001
    r = _post(demo_server.url, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"], r.text
