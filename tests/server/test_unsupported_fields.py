"""No silent gaps: an OpenAI chat field flatout does not implement, set to a value that asks for
it, is a 400 naming the field; its neutral values and unknown fields still pass; /openapi.json
describes each of them."""

from __future__ import annotations

import httpx
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
    r = _post(demo_server.url, {"messages": MSG, "max_tokens": 1, "tool_choice": "none"})
    assert r.status_code == 200, r.text


def test_tool_choice_auto_needs_the_tool_call_parser(demo_server) -> None:  # noqa: ANN001
    r = _post(demo_server.url, {"messages": MSG, "max_tokens": 1, "tool_choice": "auto"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    assert "--enable-auto-tool-choice" in r.json()["error"]["message"]


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
