"""No silent gaps: an OpenAI chat field flatout does not implement, set to a value that asks for
it, is a 400 naming the field; its neutral values and unknown fields still pass; /openapi.json
describes each of them. tool_choice without tools is a 400 (as OpenAI's, whatever its value), and
a message's required content is required alike by /openapi.json and the server."""

from __future__ import annotations

from typing import Any

import httpx
import jsonschema
import openai
import pytest

MSG = [{"role": "user", "content": "hi"}]
REFUSED = [  # response_format and tool_choice are done (test_structured_output_http.py)
    ("modalities", ["text", "audio"]),
    ("store", True),
    ("service_tier", "flex"),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("reasoning_effort", "low"),
    ("verbosity", "low"),
]
ACCEPTED = {"response_format": {"type": "text"}, "modalities": ["text"],
            "store": False, "service_tier": "auto", "parallel_tool_calls": True,
            "some_future_field": 1}


def _post(url: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


@pytest.mark.parametrize(("field", "value"), REFUSED)
@pytest.mark.parametrize("stream", [False, True])
def test_unsupported_field_is_a_400_naming_it(demo_server, field: str, value: object,  # noqa: ANN001
                                              stream: bool) -> None:
    r = _post(demo_server.url, {"messages": MSG, "max_tokens": 1, "stream": stream, field: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field and err["code"] == "unsupported_parameter", err
    assert field in err["message"]


def test_neutral_values_and_unknown_fields_pass(demo_server) -> None:  # noqa: ANN001
    r = _post(demo_server.url, {"messages": MSG, "max_tokens": 1, **ACCEPTED})
    assert r.status_code == 200, r.text
    r = _post(demo_server.url, {"messages": MSG, "max_tokens": 1, "tools": TOOLS,
                                "tool_choice": "none"})
    assert r.status_code == 200, r.text


TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


@pytest.mark.parametrize("tools", [None, []])
@pytest.mark.parametrize("tool_choice", [
    "none", "auto", "required", {"type": "function", "function": {"name": "f"}}])
def test_tool_choice_without_tools_is_a_400(demo_server, tools: object,  # noqa: ANN001
                                            tool_choice: object) -> None:
    body: dict[str, Any] = {"messages": MSG, "max_tokens": 1, "tool_choice": tool_choice}
    if tools is not None:
        body["tools"] = tools
    for stream in (False, True):
        r = _post(demo_server.url, {**body, "stream": stream})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "tool_choice" and err["type"] == "invalid_request_error", err
        assert "only allowed when 'tools' are specified" in err["message"]


def test_tool_choice_auto_needs_the_tool_call_parser(demo_server) -> None:  # noqa: ANN001
    r = _post(demo_server.url, {"messages": MSG, "max_tokens": 1, "tools": TOOLS,
                                "tool_choice": "auto"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]


def test_strict_tools_need_the_tool_call_parser(demo_server) -> None:  # noqa: ANN001
    strict = [{"type": "function", "function": {**TOOLS[0]["function"], "strict": True}}]
    r = _post(demo_server.url, {"messages": MSG, "max_tokens": 1, "tools": strict})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tools[0].function.strict", r.text
    r = _post(demo_server.url, {"messages": MSG, "max_tokens": 1, "tools": strict,
                                "tool_choice": "none"})  # no calls: nothing to enforce
    assert r.status_code == 200, r.text


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
# (messages, the param of the 400; None: accepted)
MESSAGES: list[tuple[list[dict[str, Any]], str | None]] = [
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": None, "x-odd": {"k": [1]}}], "messages[0].content"),
    ([{"role": "system"}, *MSG], "messages[0].content"),
    ([{"role": "developer", "content": None}, *MSG], "messages[0].content"),
    ([*MSG, {"role": "assistant", "tool_calls": [CALL]}, {"role": "tool"}],
     "messages[2].content"),
    ([*MSG, {"role": "assistant"}], "messages[1].content"),
    ([*MSG, {"role": "assistant", "content": None, "tool_calls": None}], "messages[1].content"),
    ([*MSG, {"role": "assistant", "content": None, "tool_calls": [CALL]},
      {"role": "tool", "tool_call_id": "c1", "content": "1"}], None),
    ([*MSG, {"role": "assistant", "tool_calls": []}, *MSG], None),
    ([*MSG, {"role": "assistant", "refusal": "no"}, *MSG], None),
    ([{"role": "user", "content": "", "x-odd": 1}], None),
    ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], None),
]


def test_message_content_required_alike_by_the_schema_and_the_server(
        demo_server) -> None:  # noqa: ANN001
    doc = httpx.get(f"{demo_server.url}/openapi.json", timeout=30).json()
    validator = jsonschema.Draft202012Validator(
        {"$ref": "#/components/schemas/ChatCompletionRequest", **doc})
    for messages, param in MESSAGES:
        body = {"messages": messages, "max_tokens": 1}
        assert validator.is_valid(body) == (param is None), messages
        r = _post(demo_server.url, body)
        if param is None:
            assert r.status_code == 200, (messages, r.text)
        else:
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (messages,
                                                                                  r.text)


def test_openai_client_gets_a_bad_request_for_an_audio_reply(demo_server) -> None:  # noqa: ANN001
    client = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="demo", messages=MSG, modalities=["text", "audio"])
    assert e.value.body["param"] == "modalities"


def test_openapi_describes_the_refused_fields(demo_server) -> None:  # noqa: ANN001
    schema = httpx.get(f"{demo_server.url}/openapi.json", timeout=30).json()
    props = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for field in [f for f, _ in REFUSED] + ["response_format", "tool_choice"]:
        assert "description" in props[field], field
    assert "logit_bias" in props and "logit_bias" in (
        schema["components"]["schemas"]["CompletionRequest"]["properties"])
