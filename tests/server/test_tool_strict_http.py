"""Strict function tools over real HTTP with the openai SDK, on the random-weight demo model
sampled at temperature 1: `flatout serve --enable-auto-tool-choice --tool-call-parser hermes` on
a copy of the demo checkpoint whose tokenizer spells one token `<tool_call>`, which logit_bias
makes the model write. Under tool_choice "auto" the model's own calls are constrained by the
strict tools' schemas; under "required" and a named function by the forced-call grammar. For
every seed each returned call's arguments validate against its tool's schema (jsonschema), and
there is at least one call (without a grammar the model writes `<tool_call>` over and over and
no call parses)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from flatout.demo import demo_model_path
from tests.server.server_process import ServerProcess

TOOL_CALL = 4087  # an added token of the demo tokenizer, respelled `<tool_call>`
WEATHER = {"type": "object", "properties": {
    "unit": {"enum": ["celsius", "fahrenheit"]},
    "days": {"type": "integer", "minimum": 1, "maximum": 7},
    "detail": {"type": "object", "properties": {"wind": {"type": "boolean"}},
               "required": ["wind"], "additionalProperties": False}},
    "required": ["unit", "days", "detail"], "additionalProperties": False}
PICK = {"type": "object", "properties": {"choice": {"enum": ["a", "b", "c"]}},
        "required": ["choice"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "pick": PICK}
TOOLS = [{"type": "function", "function": {"name": name, "parameters": schema, "strict": True}}
         for name, schema in SCHEMAS.items()]
MSG = [{"role": "user", "content": "Weather in Paris?"}]
SEEDS = range(3)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    model = tmp_path_factory.mktemp("strict-model") / "demo-strict"
    shutil.copytree(demo_model_path(), model)
    tok = json.loads((model / "tokenizer.json").read_text())
    (token,) = [t for t in tok["added_tokens"] if t["id"] == TOOL_CALL]
    spelled = token["content"]
    token["content"], token["special"] = "<tool_call>", False
    (model / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["extra_special_tokens"] = [s for s in cfg["extra_special_tokens"] if s != spelled]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    server = ServerProcess(["--model", str(model), "--max-model-len", "1024", "--num-kv-blocks",
                            "256", "--served-model-name", "demo", "--reasoning-parser", "none",
                            "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                           Path(model.parent / "serve.log"))
    try:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)
    finally:
        server.stop()


def _ask(client: openai.OpenAI, seed: int, **kw: Any) -> Any:
    return client.chat.completions.create(model="demo", messages=MSG, tools=TOOLS,
                                          temperature=1.0, seed=seed, **kw)


def _check(calls: list[tuple[str, str]]) -> None:
    assert calls, "at least one call"
    for name, arguments in calls:
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_auto_calls_follow_the_strict_schemas(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        r = _ask(client, seed, max_tokens=100, logit_bias={str(TOOL_CALL): 100})
        choice = r.choices[0]
        calls = choice.message.tool_calls or []
        _check([(c.function.name, c.function.arguments) for c in calls])
        assert choice.finish_reason == "tool_calls"


def test_auto_streamed_with_parallel_calls_off(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        calls: dict[int, list[str]] = {}
        finish = None
        for chunk in _ask(client, seed, max_tokens=100, logit_bias={str(TOOL_CALL): 100},
                          parallel_tool_calls=False, stream=True):
            for d in chunk.choices[0].delta.tool_calls or []:
                if d.id is not None:
                    calls[d.index] = [d.function.name, ""]
                calls[d.index][1] += d.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        # the grammar ends the reply after its one call
        assert len(calls) == 1 and finish == "tool_calls", (calls, finish)
        _check([(name, args) for name, args in calls.values()])


def test_required_and_named_calls_follow_the_schemas(client: openai.OpenAI) -> None:
    for seed in SEEDS:
        for tool_choice in ["required", {"type": "function", "function": {"name": "pick"}}]:
            r = _ask(client, seed, max_tokens=100, tool_choice=tool_choice,
                     parallel_tool_calls=False)
            calls = r.choices[0].message.tool_calls or []
            _check([(c.function.name, c.function.arguments) for c in calls])
            if tool_choice != "required":
                assert [c.function.name for c in calls] == ["pick"]


def test_strict_beside_response_format_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        _ask(client, 0, max_tokens=4, response_format={"type": "json_object"})
    assert e.value.body["param"] == "tools[0].function.strict", e.value.body
