"""Tool-call parsers: each format parsed whole and streamed in small pieces (the same calls and
content either way), several calls, no arguments, malformed output left as content."""

from __future__ import annotations

import json

import pytest

from flatout.server.tool_parsers import ToolCallStream, get_tool_parser

CASES = [  # parser, model output, expected content, expected [(name, arguments)]
    ("hermes", 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": '
     '{"city": "北京", "days": 2}}\n</tool_call>', "Let me check.",
     [("get_weather", {"city": "北京", "days": 2})]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n<tool_call>{"name": "b", '
     '"arguments": {"x": [1, 2]}}</tool_call>', "", [("a", {}), ("b", {"x": [1, 2]})]),
    ("hermes", '<tool_call>{"name": "a", "arguments": {</tool_call>', None, []),
    ("hermes", "no tools here, just <tool text", None, []),
    ("glm45", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
     "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", "",
     [("get_weather", {"city": "Paris", "days": 3})]),
    ("glm45", "Sure.<tool_call>now\n</tool_call><tool_call>b<arg_key>k</arg_key>"
     "<arg_value>{\"a\": 1}</arg_value></tool_call>", "Sure.",
     [("now", {}), ("b", {"k": {"a": 1}})]),
    ("glm45", "<tool_call>bad name!\n<arg_key>k</arg_key></tool_call>", None, []),
    ("glm4", 'get_weather\n{"city": "Paris"}', "", [("get_weather", {"city": "Paris"})]),
    ("glm4", "get_time\n{}", "", [("get_time", {})]),
    ("glm4", "Hello there, how are you?\nFine.", None, []),
    ("glm4", 'get_weather\n{"city": ', None, []),
    ("glm4", 'get_weather\n{"city": "Paris"}<|assistant|>now\n{}', "",  # special tokens kept
     [("get_weather", {"city": "Paris"}), ("now", {})]),
    ("glm4", 'get_weather\n{"city": "Paris"}now\n{}', "",  # <|assistant|> skipped
     [("get_weather", {"city": "Paris"}), ("now", {})]),
    ("glm4", 'get_weather\n{"city": "Paris"}\nThat is all.', None, []),
    ("glm4", "get_weather\n[1, 2]", None, []),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"q": "x"}}', "",
     [("f", {"q": "x"})]),
    ("llama3_json", '{"name": "f", "parameters": {}}; {"name": "g", "parameters": {"n": 1}}', "",
     [("f", {}), ("g", {"n": 1})]),
    ("llama3_json", '{"name": "f", "parameters": {"q"', None, []),
    ("llama3_json", "The answer is 42.", None, []),
]


def _calls(calls) -> list[tuple[str, object]]:  # noqa: ANN001
    return [(c.name, json.loads(c.arguments)) for c in calls]


@pytest.mark.parametrize(("parser", "text", "content", "expected"), CASES)
def test_parse_whole_reply(parser: str, text: str, content: str | None, expected: list) -> None:
    got_content, calls = get_tool_parser(parser).parse(text)
    assert _calls(calls) == expected
    assert got_content == (text if content is None else content)
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("piece", [1, 3, 7])
@pytest.mark.parametrize(("parser", "text", "content", "expected"), CASES)
def test_stream_matches_whole_reply(parser: str, text: str, content: str | None, expected: list,
                                    piece: int) -> None:
    stream = ToolCallStream(get_tool_parser(parser))
    streamed = "".join(stream.feed(text[i:i + piece]) for i in range(0, len(text), piece))
    rest, deltas = stream.finish()
    streamed += rest
    if expected:
        assert streamed.strip() == content
    else:
        assert streamed == text and deltas == []
    # OpenAI's shape: a head per call (index, id, type, name, empty arguments), then pieces
    calls: dict[int, dict] = {}
    for d in deltas:
        if "id" in d:
            assert d["type"] == "function" and d["function"]["arguments"] == ""
            assert d["index"] == len(calls) and d["id"].startswith("call_")
            calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
        else:
            assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}
            calls[d["index"]]["arguments"] += d["function"]["arguments"]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == expected


def test_plain_text_streams_at_once_before_a_marker() -> None:
    stream = ToolCallStream(get_tool_parser("hermes"))
    assert stream.feed("Hello wor") == "Hello wor"
    assert stream.feed("ld <tool") == "ld "  # a marker's prefix is held
    assert stream.feed("bar") == "<toolbar"  # …and released when it is not one


def test_unknown_parser_is_named() -> None:
    with pytest.raises(ValueError, match="hermes"):
        get_tool_parser("nope")
    with pytest.raises(ValueError, match="MysteryForCausalLM"):
        get_tool_parser("auto", "MysteryForCausalLM")


@pytest.mark.parametrize(("architecture", "parser"), [
    ("GlmForCausalLM", "Glm4Parser"), ("ChatGLMModel", "Glm4Parser"),
    ("Glm4ForCausalLM", "Glm4Parser"), ("Qwen3ForCausalLM", "HermesParser"),
    ("LlamaForCausalLM", "Llama3JsonParser")])
def test_auto_picks_the_architectures_format(architecture: str, parser: str) -> None:
    assert type(get_tool_parser("auto", architecture)).__name__ == parser


def test_one_call_at_most_without_parallel_tool_calls() -> None:
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", ' \
           '"arguments": {}}</tool_call>'
    stream = ToolCallStream(get_tool_parser("hermes"), max_calls=1)
    assert stream.feed(text) == ""
    _, deltas = stream.finish()
    assert [d["function"]["name"] for d in deltas if "id" in d] == ["a"]
    # tool_choice required: the grammar's array holds exactly one call
    from flatout.server.structured import ForcedToolCalls

    tools = [{"type": "function", "function": {"name": "a"}}]
    one = ForcedToolCalls.from_request("required", tools, parallel=False)
    assert one is not None and one.structured_outputs().json["maxItems"] == 1
    many = ForcedToolCalls.from_request("required", tools)
    assert many is not None and "maxItems" not in many.structured_outputs().json
