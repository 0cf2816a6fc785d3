"""A hypothesis fuzz over the chat request's tool fields (tools, tool_choice, assistant messages
with tool_calls, tool results, response_format), valid and not, streamed and not, against a
server with a tool-call parser: every answer is a 200 (well formed: a stream ends with [DONE],
its only error events are client errors) or a 4xx in OpenAI's error shape, never a 5xx, and
once it is over nothing runs and the KV pool is whole again."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.reliability.harness import wait_idle
from tests.server.server_process import ServerProcess

EXAMPLES = 120

leaf = st.none() | st.booleans() | st.integers(-3, 3) | st.text(max_size=6)
junk = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=5)


def _bodies(junk: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Chat bodies whose tool fields take valid and invalid values; `junk` (st.nothing() for
    none) may stand in for any of them, a value of the wrong shape."""

    def mostly(*valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(*valid, *valid, junk)

    names = mostly(st.sampled_from(["get_weather", "now", "a.b-c_1", "", "bad name"]))
    schemas = mostly(st.sampled_from([
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        {"type": "object", "properties": {}},
        {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3}},
         "additionalProperties": False},
        {"type": "objectx"}, {"type": "string"}, {"enum": ["a", "b"]}, {"$ref": "#/nowhere"},
    ]))
    functions = st.fixed_dictionaries({"name": names}, optional={
        "description": st.text(max_size=8), "parameters": schemas,
        "strict": mostly(st.booleans())})
    tools = mostly(st.lists(mostly(st.fixed_dictionaries({
        "type": st.sampled_from(["function", "function", "code"]), "function": functions})),
        max_size=3))
    tool_choices = mostly(st.sampled_from(["none", "auto", "required", "any"]),
                          st.fixed_dictionaries({"type": mostly(st.just("function")),
                                                 "function": st.fixed_dictionaries({
                                                     "name": names})}))
    arguments = mostly(st.sampled_from(['{"city": "Paris"}', "{}", "", "{not json", "[1]", "5",
                                        '"s"', "[" * 3000]),
                       st.dictionaries(st.text(max_size=4), leaf, max_size=2))
    calls = mostly(st.fixed_dictionaries({
        "id": st.text(max_size=6), "type": st.sampled_from(["function", "function", "other"]),
        "function": mostly(st.fixed_dictionaries({"name": names, "arguments": arguments}))}))
    contents = mostly(st.none(), st.text(max_size=10), st.lists(st.fixed_dictionaries({
        "type": st.sampled_from(["text", "text", "image_url"]), "text": st.text(max_size=6)}),
        max_size=2))
    messages = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "assistant", "tool", "tool", "system",
                                  "developer", "robot"]), "content": contents},
        optional={"tool_calls": mostly(st.lists(calls, max_size=2)),
                  "tool_call_id": mostly(st.text(max_size=6))})
    response_formats = mostly(st.sampled_from([
        {"type": "text"}, {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}},
        {"type": "json_schema"}, {"type": "xml"},
    ]))
    return st.fixed_dictionaries(
        {"model": st.just("demo"),
         "messages": mostly(st.lists(messages, max_size=3).map(
             lambda m: [{"role": "user", "content": "Weather?"}, *m]),
             st.lists(messages, min_size=1, max_size=3)),
         "max_tokens": st.integers(1, 4), "stream": st.booleans()},
        optional={"tools": tools, "tool_choice": tool_choices,
                  "response_format": response_formats, "n": st.integers(1, 2),
                  "parallel_tool_calls": st.booleans()})


# half the bodies have only well-shaped fields (their values still valid or not), half may
# have a value of the wrong shape anywhere
bodies = _bodies(st.nothing()) | _bodies(junk)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("fuzz-tools") / "serve.log"
    s = ServerProcess(["--max-model-len", "512", "--num-kv-blocks", "512", "--served-model-name",
                       "demo", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"], log)
    try:
        yield s
    finally:
        s.stop()


def _with_call(arguments: Any, **fields: Any) -> dict[str, Any]:
    """A conversation with one earlier call of get_weather and its result."""
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": arguments}}
    return {"model": "demo", "max_tokens": 2, "tools": [{"type": "function", "function": {
        "name": "get_weather", "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}}}}}], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "21"}]}],
        **fields}


def _client_error(err: Any) -> bool:
    return (isinstance(err, dict) and isinstance(err.get("message"), str)
            and err.get("type") == "invalid_request_error" and {"param", "code"} <= set(err))


def _check(r: httpx.Response, body: dict[str, Any]) -> None:
    assert r.status_code < 500, r.text
    if r.status_code != 200:
        assert 400 <= r.status_code < 500 and _client_error(r.json().get("error")), r.text
        return
    if body.get("stream"):
        lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert lines and lines[-1] == "[DONE]", r.text[-500:]
        for line in lines[:-1]:
            event = json.loads(line)
            assert "error" not in event or _client_error(event["error"]), line
        return
    choices = r.json()["choices"]
    assert len(choices) == body.get("n", 1)
    for c in choices:
        for call in c["message"].get("tool_calls") or []:
            assert call["type"] == "function" and call["id"]
            assert isinstance(json.loads(call["function"]["arguments"]), dict)


def test_tool_fields_fuzz_never_a_server_error(server: ServerProcess) -> None:
    with httpx.Client(base_url=server.url, timeout=60) as http:

        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(body=bodies)
        @example(body=_with_call("[" * 3000))  # nested past Python's recursion limit
        @example(body=_with_call("{not json"))
        @example(body=_with_call({"city": "Paris"}, stream=True, tool_choice="required"))
        @example(body=_with_call('{"city": "Paris"}', tool_choice={
            "type": "function", "function": {"name": "get_weather"}}, response_format={
                "type": "json_object"}))
        def one(body: dict[str, Any]) -> None:
            _check(http.post("/v1/chat/completions", json=body), body)

        one()
        # the server still answers, and once idle it holds no KV block and runs nothing
        ok = http.post("/v1/chat/completions", json={
            "model": "demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200, ok.text
    m = wait_idle(server)
    assert m["flatout:kv_cache_usage_perc"] == 0 and m["flatout:num_requests_running"] == 0
    assert m["flatout:num_requests_waiting"] == 0
