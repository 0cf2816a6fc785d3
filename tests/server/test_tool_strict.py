"""Strict function tools under tool_choice "auto": the grammar each parser builds (compiled by
the engine's GrammarCompiler against the demo tokenizer) takes the parser's well-formed calls
whose arguments follow the strict tools' schemas and refuses calls that break them, and leaves
the text around calls free; the parsers whose calls carry no JSON arguments refuse strict with a
400 naming the tool's field."""

from __future__ import annotations

from typing import Any

import pytest
import xgrammar as xgr

from flatout.demo import demo_model_path
from flatout.engine.structured import GrammarCompiler
from flatout.server.errors import OpenAIError
from flatout.server.structured import strict_tool_calls, strict_tools
from flatout.server.tool_parsers import get_tool_parser

WEATHER = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
                                            "days": {"type": "integer"}},
           "required": ["unit", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER,
                                           "strict": True}},
         {"type": "function", "function": {"name": "now"}}]  # not strict: any object


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    return GrammarCompiler(demo_model_path(), vocab_size=4096)


def _accepts(compiler: GrammarCompiler, parser: str, text: str, parallel: bool = True) -> bool:
    so = strict_tool_calls(TOOLS, get_tool_parser(parser), parallel)
    assert so is not None and so.field == "tools[0].function.strict"
    matcher = xgr.GrammarMatcher(compiler.compile_now(so))
    return matcher.accept_string(text)


GOOD = {
    "hermes": ['Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"unit": "c", '
               '"days": 2}}\n</tool_call>',
               '<tool_call>{"name": "get_weather", "arguments": {"unit": "f","days": 7}}'
               '</tool_call>\n<tool_call>{"name": "now", "arguments": {"x": [1]}}</tool_call>',
               "no call at all, {braces} fine"],
    "llama3_json": ['<|python_tag|>{"name": "get_weather", "parameters": {"unit": "c", '
                    '"days": 2}}; {"name": "now", "parameters": {}}',
                    "no call at all"],
}
BAD = {
    "hermes": ['<tool_call>{"name": "get_weather", "arguments": {"unit": "kelvin", "days": 2}}',
               '<tool_call>{"name": "get_weather", "arguments": {"unit": "c"}}</tool_call>',
               '<tool_call>{"name": "get_weather", "arguments": {"unit": "c", "days": 2, '
               '"x": 1}}</tool_call>',
               '<tool_call>{"name": "other", "arguments": {}}</tool_call>',
               '<tool_call>{"arguments": {}, "name": "now"}</tool_call>'],
    "llama3_json": ['{"name": "get_weather", "parameters": {"unit": "c", "days": "2"}}',
                    '{"name":"get_weather","parameters":{}}',
                    'text {"name": "other", "parameters": {}}'],
}


@pytest.mark.parametrize("parser", sorted(GOOD))
def test_grammar_takes_valid_calls_and_refuses_invalid_ones(compiler: GrammarCompiler,
                                                            parser: str) -> None:
    for text in GOOD[parser]:
        assert _accepts(compiler, parser, text), text
    for text in BAD[parser]:
        assert not _accepts(compiler, parser, text), text


def test_parallel_false_ends_after_the_first_call(compiler: GrammarCompiler) -> None:
    one = '<tool_call>{"name": "now", "arguments": {}}</tool_call>'
    assert _accepts(compiler, "hermes", one, parallel=False)
    assert not _accepts(compiler, "hermes", one + " and more", parallel=False)
    assert _accepts(compiler, "hermes", one + " and more", parallel=True)


@pytest.mark.parametrize("parser", ["glm4", "glm45"])
def test_formats_without_json_arguments_refuse_strict(parser: str) -> None:
    with pytest.raises(OpenAIError) as e:
        strict_tool_calls(TOOLS, get_tool_parser(parser))
    assert e.value.param == "tools[0].function.strict" and parser in e.value.message


def test_no_strict_tool_constrains_nothing_and_strict_must_be_a_boolean() -> None:
    loose: list[dict[str, Any]] = [{"type": "function", "function": {"name": "f",
                                                                     "strict": False}}]
    assert strict_tool_calls(loose, get_tool_parser("glm45")) is None
    assert strict_tools(TOOLS) == [0]
    with pytest.raises(OpenAIError) as e:
        strict_tools([{"type": "function", "function": {"name": "f", "strict": "yes"}}])
    assert e.value.param == "tools[0].function.strict"
    with pytest.raises(OpenAIError) as e:  # no parser: nothing would enforce it
        strict_tool_calls(TOOLS, None)
    assert "--tool-call-parser" in e.value.message
