"""Tool calls out of a model's text, in the formats our models emit (no torch).

Each parser turns a finished reply into (content, calls); output that does not parse is left as
content, never an error. `ToolCallStream` streams a reply: text before a possible tool call
passes through at once, the rest is held until the reply ends (or until it can no longer be a
tool call) and then comes out as OpenAI's `delta.tool_calls` pieces.

Formats:
- glm4 (GLM-4-9B-chat, GLM-4-0414): the whole reply is `name\\n{json arguments}` (several: one
  after another, each after its own `<|assistant|>`), as their model cards' function-call
  examples parse it and their templates write calls back (the name as the assistant turn's
  metadata, the arguments as its text).
- glm45 (GLM-4.5 and later): `<tool_call>name\\n<arg_key>k</arg_key><arg_value>v</arg_value>…
  </tool_call>`, values JSON where they parse, else strings.
- hermes (Qwen2.5/Qwen3): `<tool_call>{"name": …, "arguments": {…}}</tool_call>`.
- llama3_json (Llama-3.1): `[<|python_tag|>]{"name": …, "parameters": {…}}`, several joined by `;`.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, as OpenAI's function.arguments
    id: str = field(default_factory=lambda: f"call_{secrets.token_hex(12)}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


class ToolParser:
    """Base: `start` marks where a tool call may begin (None: the reply's very start)."""

    name = ""
    start: str | None = None

    def structural_tag(self, arguments: dict[str, dict[str, Any]],
                       parallel: bool) -> dict[str, Any] | None:
        """A grammar (xgrammar's structural tag) for replies of this format in which each call's
        arguments follow its schema (`arguments`: tool name -> JSON schema): any text until a
        call begins, then the call constrained, then any text again (`parallel` False: the reply
        ends after its first call). None: this format's calls cannot be constrained so."""
        return None

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """(content, calls) of a finished reply; ([text], []) when no well-formed call."""
        raise NotImplementedError

    def held_from(self, text: str) -> int | None:
        """Where the held-back (possible tool call) part of `text` starts; None: none so far."""
        if self.start is None:
            return 0
        i = text.find(self.start)
        if i >= 0:
            return i
        for k in range(min(len(self.start) - 1, len(text)), 0, -1):  # a marker's prefix at the end
            if self.start.startswith(text[-k:]):
                return len(text) - k
        return None

    def still_possible(self, held: str) -> bool:
        """Whether held text may still become a tool call (False: release it as content)."""
        return True


def _arguments(value: object) -> str | None:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else None


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _calls_grammar(trigger: str, begins: list[str], ends: list[str],
                  arguments: dict[str, dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """Free text in which every `trigger` starts a call: one of `begins` (with the tool's name
    in place of `{name}`), its arguments following the tool's schema, one of `ends`."""
    tags = [{"type": "tag", "begin": begin.format(name=json.dumps(name)[1:-1]),
             "content": {"type": "json_schema", "json_schema": schema,
                         # one whitespace character in a row at most: a sampled model cannot
                         # wander off into endless blanks inside a call
                         "max_whitespace_cnt": 1},
             "end": ends}
            for name, schema in arguments.items() for begin in begins]
    return {"type": "structural_tag", "format": {
        "type": "triggered_tags", "triggers": [trigger], "tags": tags,
        "stop_after_first": not parallel}}


class HermesParser(ToolParser):
    name = "hermes"
    start = "<tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)

    def structural_tag(self, arguments: dict[str, dict[str, Any]],
                       parallel: bool) -> dict[str, Any] | None:
        # every <tool_call> starts a call; its JSON as Qwen's templates write it back, with or
        # without the newlines inside the tags
        return _calls_grammar(
            "<tool_call>", ['<tool_call>\n{{"name": "{name}", "arguments": ',
                            '<tool_call>{{"name": "{name}", "arguments": '],
            ["}\n</tool_call>", "}</tool_call>"], arguments, parallel)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        calls = []
        for body in self._CALL.findall(text):
            obj = _json_object(body.strip())
            args = _arguments(obj.get("arguments", {})) if obj else None
            if obj is None or not isinstance(obj.get("name"), str) or args is None:
                return text, []
            calls.append(ToolCall(obj["name"], args))
        if not calls:
            return text, []
        return self._CALL.sub("", text).strip(), calls


class Glm45Parser(ToolParser):
    name = "glm45"
    start = "<tool_call>"
    _CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
    _ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        calls = []
        for body in self._CALL.findall(text):
            name, _, rest = body.strip().partition("\n")
            name = name.strip()
            if "<" in name:  # `<tool_call>f<arg_key>…`: the name ends at the first tag
                name, _, tail = name.partition("<")
                rest = "<" + tail + rest
                name = name.strip()
            if not re.fullmatch(r"[\w.\-]+", name):
                return text, []
            args: dict[str, Any] = {}
            for key, value in self._ARG.findall(rest):
                try:
                    args[key.strip()] = json.loads(value)
                except (ValueError, RecursionError):
                    args[key.strip()] = value
            if self._ARG.sub("", rest).strip():  # anything but arguments: not this format
                return text, []
            calls.append(ToolCall(name, json.dumps(args, ensure_ascii=False)))
        if not calls:
            return text, []
        return self._CALL.sub("", text).strip(), calls


class Glm4Parser(ToolParser):
    """GLM-4-9B-chat: the whole reply is `name\\n{json}`, or several such calls, each after an
    `<|assistant|>` of its own (gone from the text when special tokens are skipped)."""

    name = "glm4"
    _NAME = re.compile(r"[\w.\-]+")
    _TURN = "<|assistant|>"

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        decoder = json.JSONDecoder()
        calls: list[ToolCall] = []
        rest = text.strip()
        while rest:
            name, newline, body = rest.partition("\n")
            if not newline or not self._NAME.fullmatch(name.strip()):
                return text, []
            body = body.lstrip()
            try:
                obj, end = decoder.raw_decode(body)
            except (ValueError, RecursionError):
                return text, []
            if not isinstance(obj, dict):
                return text, []
            calls.append(ToolCall(name.strip(), json.dumps(obj, ensure_ascii=False)))
            rest = body[end:].strip().removeprefix(self._TURN).lstrip()
        return ("", calls) if calls else (text, [])

    def still_possible(self, held: str) -> bool:
        name, newline, rest = held.lstrip().partition("\n")
        if not newline:
            return not name or bool(self._NAME.fullmatch(name.strip()))
        rest = rest.lstrip()
        return bool(self._NAME.fullmatch(name.strip())) and (not rest or rest[0] == "{")


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    _TAG = "<|python_tag|>"

    def structural_tag(self, arguments: dict[str, dict[str, Any]],
                       parallel: bool) -> dict[str, Any] | None:
        # every `{` starts a call (so text around calls holds none, and no call can slip
        # past the grammar in another spelling); `<|python_tag|>` and the `; ` between calls
        # are text
        return _calls_grammar("{", ['{{"name": "{name}", "parameters": '], ["}"], arguments,
                              parallel)

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        body = text.strip().removeprefix(self._TAG).strip()
        if not body.startswith("{"):
            return text, []
        decoder = json.JSONDecoder()
        calls, i = [], 0
        while i < len(body):
            try:
                obj, end = decoder.raw_decode(body, i)
            except (ValueError, RecursionError):
                return text, []
            args = _arguments(obj.get("parameters", obj.get("arguments", {}))) if isinstance(
                obj, dict) else None
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or args is None:
                return text, []
            calls.append(ToolCall(obj["name"], args))
            i = end
            while i < len(body) and body[i] in " \t\r\n;":
                i += 1
        return "", calls

    def still_possible(self, held: str) -> bool:
        s = held.lstrip()
        return not s or s.startswith("{") or self._TAG.startswith(s[:len(self._TAG)])


PARSERS: dict[str, type[ToolParser]] = {
    "glm4": Glm4Parser, "glm45": Glm45Parser, "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
}


# `--tool-call-parser auto`: the format each architecture's chat models emit
_BY_ARCHITECTURE = {
    "GlmForCausalLM": "glm4", "ChatGLMModel": "glm4", "ChatGLMForConditionalGeneration": "glm4",
    "Glm4ForCausalLM": "glm4", "Qwen2ForCausalLM": "hermes", "Qwen3ForCausalLM": "hermes",
    "LlamaForCausalLM": "llama3_json",
}


def get_tool_parser(name: str, architecture: str | None = None) -> ToolParser:
    """The parser called `name`; `auto` picks it from the checkpoint's architecture."""
    if name == "auto":
        if architecture not in _BY_ARCHITECTURE:
            raise ValueError(f"--tool-call-parser auto knows no format for {architecture}; "
                             f"choose one of {', '.join(sorted(PARSERS))}")
        name = _BY_ARCHITECTURE[architecture]
    if name not in PARSERS:
        raise ValueError(f"unknown tool call parser {name!r}; choose one of "
                         f"{', '.join(sorted(PARSERS))}")
    return PARSERS[name]()


ARGUMENT_PIECE = 16  # characters of arguments per streamed delta


class ToolCallStream:
    """One choice's stream: `feed` the text deltas, `finish` at the end; both return
    (content delta, tool_calls deltas)."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser = parser
        self.max_calls = max_calls  # parallel_tool_calls false: 1 (later calls are dropped)
        self.text = ""
        self.sent = 0  # characters of text released as content
        self.released = False  # the held part proved not a tool call: plain text from here
        self.calls: list[ToolCall] = []

    def feed(self, delta: str) -> str:
        self.text += delta
        if self.released:
            return self._release(len(self.text))
        held = self.parser.held_from(self.text[self.sent:])
        if held is None:
            return self._release(len(self.text))
        start = self.sent + held
        if not self.parser.still_possible(self.text[start:]):
            self.released = self.parser.start is None
            return self._release(len(self.text) if self.released else start + 1)
        return self._release(start)

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        if self.released or not rest:
            return rest, []
        content, calls = self.parser.parse(rest)
        self.calls = calls = calls[:self.max_calls]
        return content, tool_call_deltas(calls)

    def _release(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out


def tool_call_deltas(calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's streamed shape: per call, first index, id, type and the name with empty
    arguments, then the arguments in pieces."""
    deltas: list[dict[str, Any]] = []
    for index, call in enumerate(calls):
        deltas.append({"index": index, "id": call.id, "type": "function",
                       "function": {"name": call.name, "arguments": ""}})
        for i in range(0, len(call.arguments), ARGUMENT_PIECE):
            deltas.append({"index": index,
                           "function": {"arguments": call.arguments[i:i + ARGUMENT_PIECE]}})
    return deltas
