"""Every class of malformed request gets a 4xx in OpenAI's error shape; none gets a 5xx."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MSG = [{"role": "user", "content": "hi"}]
LONG = "word " * 600  # far beyond the server's max_model_len of 384

# (endpoint, raw body, expected status, expected param or None, expected code or None)
CASES = [
    ("chat", b"{not json", 400, None, "json_invalid"),
    ("chat", b"", 400, None, "json_invalid"),
    ("chat", b"[1, 2]", 400, None, None),
    ("chat", {"messages": []}, 400, "messages", None),
    ("chat", {"model": "demo"}, 400, "messages", "missing"),
    ("chat", {"messages": "hi"}, 400, "messages", None),
    ("chat", {"messages": [{"content": "no role"}]}, 400, "messages.0.role", "missing"),
    ("chat", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", None),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]", None),
    ("chat", {"messages": MSG, "temperature": "hot"}, 400, "temperature", "invalid_type"),
    ("chat", {"messages": MSG, "stream": "yes"}, 400, "stream", "invalid_type"),
    ("chat", {"messages": MSG, "n": 1.5}, 400, "n", "invalid_type"),
    ("chat", {"messages": MSG, "max_tokens": "10"}, 400, "max_tokens", "invalid_type"),
    ("chat", {"messages": MSG, "temperature": -1}, 400, "temperature", "invalid_value"),
    ("chat", {"messages": MSG, "top_p": 0}, 400, "top_p", "invalid_value"),
    ("chat", {"messages": MSG, "n": 0}, 400, "n", "invalid_value"),
    ("chat", {"messages": MSG, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("chat", {"messages": MSG, "presence_penalty": 3}, 400, "presence_penalty", "invalid_value"),
    ("chat", {"messages": MSG, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs",
     "invalid_value"),
    ("chat", {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("chat", {"messages": MSG, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("chat", {"messages": [{"role": "user", "content": LONG}]}, 400, None,
     "context_length_exceeded"),
    ("chat", {"messages": MSG, "max_tokens": 5000}, 400, None, "context_length_exceeded"),
    ("chat", {"messages": MSG, "chat_template_kwargs": {"messages": []}}, 400,
     "chat_template_kwargs", None),
    ("completions", {"prompt": ""}, 400, "prompt", None),
    ("completions", {"prompt": []}, 400, "prompt", None),
    ("completions", {"prompt": LONG}, 400, None, "context_length_exceeded"),
    ("completions", {"prompt": [1, 2, 999999]}, 400, None, None),  # token id outside the vocab
    ("completions", {"prompt": "hi", "logprobs": 99}, 400, "logprobs", "invalid_value"),
    ("completions", {"prompt": "hi", "stop": 5}, 400, "stop", "invalid_type"),
    ("completions", {"prompt": "hi", "model": "nope"}, 404, "model", "model_not_found"),
    ("completions", {"prompt": {"text": "hi"}}, 400, None, "invalid_type"),
]


def _post(url: str, endpoint: str, body: object, stream: bool = False) -> httpx.Response:
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    if not isinstance(body, bytes):
        body = json.dumps({**body, "stream": stream} if stream and isinstance(body, dict)
                          else body).encode()
    return httpx.post(url + path, content=body, headers={"Content-Type": "application/json"},
                      timeout=60)


def _check_shape(r: httpx.Response, status: int, param: str | None, code: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
    if code is not None:
        assert err["code"] == code, err


@pytest.mark.parametrize(("endpoint", "body", "status", "param", "code"), CASES)
def test_malformed_request(demo_server, endpoint: str, body: object, status: int,  # noqa: ANN001
                           param: str | None, code: str | None) -> None:
    _check_shape(_post(demo_server.url, endpoint, body), status, param, code)
    if isinstance(body, dict) and "stream" not in body:  # a streaming request fails the same way
        _check_shape(_post(demo_server.url, endpoint, body, stream=True), status, param, code)


def test_unknown_fields_are_ignored(demo_server) -> None:  # noqa: ANN001
    body = {"messages": MSG, "max_tokens": 2, "frequency_penalty": 0.1, "user": "u1",
            "response_format": {"type": "text"}, "some_future_field": {"x": 1},
            "best_of": 1, "parallel_tool_calls": False}
    r = _post(demo_server.url, "chat", body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["role"] == "assistant"


def test_other_http_errors_have_the_shape(demo_server) -> None:  # noqa: ANN001
    r = httpx.get(f"{demo_server.url}/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]
    r = httpx.get(f"{demo_server.url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_openai_client_raises_its_typed_errors(demo_server) -> None:  # noqa: ANN001
    client = openai.OpenAI(base_url=f"{demo_server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="demo", prompt="hi", temperature=-3)
    assert e.value.body["param"] == "temperature"


def test_no_server_errors_were_counted(demo_server) -> None:  # noqa: ANN001
    text = httpx.get(f"{demo_server.url}/metrics").text
    lines = [x for x in text.splitlines() if x.startswith("flatout:http_requests_total{")]
    assert any('status="400"' in x for x in lines)
    assert not any('status="5' in x for x in lines), lines
