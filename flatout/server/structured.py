"""The request fields that constrain the output, turned into `StructuredOutputsParams` (no torch).

Accepted, at most one of them per request (a second is a 400):
- OpenAI's `response_format`: `{"type": "json_object"}` or `{"type": "json_schema",
  "json_schema": {"name": …, "schema": {…}}}` (`{"type": "text"}` constrains nothing);
- vLLM's `structured_outputs` object (`json`, `regex`, `choice`, `grammar` or `json_object`) and
  its older `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar` fields;
- chat's `tool_choice` `"required"` or a named function: the output is then JSON the grammar
  forces into tool calls (`ForcedToolCalls`), whatever format the model's own calls take;
- chat's function tools with `"strict": true` under `tool_choice` `"auto"`: the model's own
  calls, in its parser's format, with each strict tool's arguments following its schema
  (`strict_tool_calls`); a parser whose format has no JSON arguments to constrain refuses them.

JSON schemas are checked here against their metaschema, so a malformed one is a 400 before the
request is queued (streamed or not); one that the engine's grammar compiler still refuses fails
the request there with a 400 naming the same field.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

import jsonschema

from flatout.sampling_params import SamplingParamsError, StructuredOutputsParams
from flatout.server.errors import OpenAIError
from flatout.server.tool_parsers import ToolCall, ToolParser, tool_call_deltas

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
_STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def _bad(field: str, message: str) -> OpenAIError:
    return OpenAIError(f"{field}: {message}", param=field, code="invalid_value")


def _params(field: str, **kw: Any) -> StructuredOutputsParams:
    try:
        so = StructuredOutputsParams(field=field, **kw)
    except SamplingParamsError as e:
        raise OpenAIError(str(e), param=field, code="invalid_value") from None
    if isinstance(so.json, dict):
        check_schema(so.json, field)
    return so


def check_schema(schema: dict[str, Any], field: str) -> None:
    """A 400 naming `field` when `schema` is not a valid JSON schema."""
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except RecursionError:
        raise _bad(field, "the JSON schema is nested too deeply") from None
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.path)
        raise _bad(field, f"invalid JSON schema{f' at {where}' if where else ''}: "
                   f"{e.message:.200}") from None


def from_response_format(value: Any) -> StructuredOutputsParams | None:
    """OpenAI's response_format (None: free text)."""
    if value is None:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise _bad("response_format", 'must be an object with a "type"')
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return _params("response_format", json_object=True)
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise _bad("response_format", 'json_schema needs a "json_schema" object')
        schema = spec.get("schema")
        if schema is None:  # OpenAI's schema is optional: any JSON object
            return _params("response_format", json_object=True)
        if not isinstance(schema, dict):
            raise _bad("response_format", "json_schema.schema must be an object")
        return _params("response_format", json=schema)
    raise _bad("response_format",
               f"type must be text, json_object or json_schema, got {kind!r:.40}")


def from_structured_outputs(value: Any) -> StructuredOutputsParams | None:
    """vLLM's structured_outputs object."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("structured_outputs", "must be an object")
    unknown = sorted(set(value) - set(_STRUCTURED_KEYS))
    if unknown:
        raise OpenAIError(f"structured_outputs.{unknown[0]} is not supported by this server "
                          f"(supported: {', '.join(_STRUCTURED_KEYS)})",
                          param=f"structured_outputs.{unknown[0]}", code="unsupported_parameter")
    return _params("structured_outputs", **{k: v for k, v in value.items() if v is not None})


def from_guided(values: dict[str, Any]) -> list[StructuredOutputsParams]:
    """vLLM's guided_* fields that are set."""
    return [_params(name, **{GUIDED_FIELDS[name]: v}) for name, v in values.items()
            if v is not None]


def one_of(*found: StructuredOutputsParams | None) -> StructuredOutputsParams | None:
    """The request's one constraint; a 400 when several fields ask for one."""
    given = [so for so in found if so is not None]
    if len(given) > 1:
        raise OpenAIError(f"{given[0].field} and {given[1].field} both constrain the output: "
                          f"set only one", param=given[1].field, code="invalid_value")
    return given[0] if given else None


# -- tool_choice required / named function ---------------------------------------------------------
def _functions(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """name -> parameters schema of the request's function tools."""
    out: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if tool.get("type", "function") == "function" else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad(f"tools[{i}]", 'must be {"type": "function", "function": {"name": …}}')
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise _bad(f"tools[{i}].function.parameters", "must be a JSON schema object")
        check_schema(params, f"tools[{i}].function.parameters")
        out[fn["name"]] = params
    return out


def strict_tools(tools: list[dict[str, Any]] | None) -> list[int]:
    """The indices of the function tools with `"strict": true` (a 400 for a strict that is
    not a boolean)."""
    out = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function")
        strict = fn.get("strict") if isinstance(fn, dict) else None
        if strict is None or strict is False:
            continue
        if strict is not True:
            raise _bad(f"tools[{i}].function.strict", f"must be a boolean, got {strict!r:.40}")
        out.append(i)
    return out


def strict_tool_calls(tools: list[dict[str, Any]], parser: ToolParser | None,
                      parallel: bool = True) -> StructuredOutputsParams | None:
    """The grammar of replies whose calls of strict tools follow their parameters' schemas
    (`tool_choice` "auto"; the other tools' arguments: any JSON object); None when no tool is
    strict. A 400 naming the first strict tool where the server parses no tool calls, or its
    parser's format cannot be constrained (its arguments are not one JSON object)."""
    strict = strict_tools(tools)
    if not strict:
        return None
    field = f"tools[{strict[0]}].function.strict"
    if parser is None:
        raise OpenAIError(f"{field}: strict tools need the server started with "
                          "--enable-auto-tool-choice --tool-call-parser NAME", param=field,
                          code="unsupported_parameter")
    functions = _functions(tools)
    names = [tools[i]["function"]["name"] for i in strict]
    arguments = {name: schema if name in names else {"type": "object"}
                 for name, schema in functions.items()}
    tag = parser.structural_tag(arguments, parallel)
    if tag is None:
        raise OpenAIError(f"{field}: the {parser.name} tool call parser cannot enforce strict "
                          "schemas (its calls do not carry the arguments as one JSON object); "
                          "use tool_choice \"required\" or a named function, which a grammar "
                          "enforces, or strict: false", param=field,
                          code="unsupported_parameter")
    return _params(field, structural_tag=tag)


@dataclass
class ForcedToolCalls:
    """`tool_choice` "required" (`name` None: one or more calls of any tool, as a JSON array of
    {"name", "parameters"}) or a named function (the output is its arguments object)."""

    name: str | None
    functions: dict[str, dict[str, Any]]
    parallel: bool = True  # False (parallel_tool_calls): the array holds exactly one call

    @classmethod
    def from_request(cls, tool_choice: Any, tools: list[dict[str, Any]] | None,
                     parallel: bool = True) -> ForcedToolCalls | None:
        if tool_choice is None or tool_choice in ("none", "auto"):
            return None
        if tool_choice == "required":
            name = None
        elif (isinstance(tool_choice, dict) and tool_choice.get("type") == "function"
              and isinstance(tool_choice.get("function"), dict)
              and isinstance(tool_choice["function"].get("name"), str)):
            name = tool_choice["function"]["name"]
        else:
            raise _bad("tool_choice", 'must be "none", "auto", "required" or {"type": '
                       '"function", "function": {"name": …}}')
        functions = _functions(tools)
        if not functions:
            raise _bad("tool_choice", f"{'required' if name is None else 'a named function'} "
                       "needs tools")
        if name is not None and name not in functions:
            raise _bad("tool_choice", f"no tool is named {name!r:.80}")
        return cls(name, functions, parallel)

    def structured_outputs(self) -> StructuredOutputsParams:
        if self.name is not None:
            return _params("tool_choice", json=self.functions[self.name])
        calls = [{"type": "object", "properties": {"name": {"const": n}, "parameters": p},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for n, p in self.functions.items()]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return _params("tool_choice", json=schema)

    def parse(self, text: str) -> list[ToolCall] | None:
        """The calls in a finished output; None when it is not complete JSON (cut short)."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return None
        if self.name is not None:
            if not isinstance(value, dict):
                return None
            return [ToolCall(self.name, json.dumps(value, ensure_ascii=False))]
        if not isinstance(value, list) or not value:
            return None
        calls = []
        for item in value:
            if not isinstance(item, dict) or item.get("name") not in self.functions:
                return None
            calls.append(ToolCall(item["name"], json.dumps(item.get("parameters", {}),
                                                           ensure_ascii=False),
                                  id=f"call_{secrets.token_hex(12)}"))
        return calls


class ForcedToolStream:
    """A streamed choice under a forced tool_choice: the text is held, and comes out as
    `delta.tool_calls` pieces at the end (as content if the output was cut short). Same
    interface as tool_parsers.ToolCallStream."""

    def __init__(self, forced: ForcedToolCalls) -> None:
        self.forced = forced
        self.text = ""

    def feed(self, delta: str) -> str:
        self.text += delta
        return ""

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        calls = self.forced.parse(self.text)
        if calls is None:
            return self.text, []
        return "", tool_call_deltas(calls)
