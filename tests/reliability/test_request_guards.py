"""POST bodies must be JSON (415 otherwise) and, with --allowed-hosts, the Host header must name
the server: what keeps a web page in the user's browser (a form post, a DNS-rebinding page) from
driving a local server that has no API key."""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.testclient import TestClient

from flatout.cli import build_parser
from flatout.server.request_guards import RequestGuards, host_allowed
from tests.reliability.harness import CHAT

BODY = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}'


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx",
                                          "text/json"])
def test_non_json_posts_get_415(api: httpx.Client, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    for path in (CHAT, "/v1/completions", "/tokenize", "/detokenize"):
        r = api.post(path, content=BODY, headers=headers)
        assert r.status_code == 415, (path, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"}
        assert err["code"] == "unsupported_media_type" and "application/json" in err["message"]


def test_json_posts_with_parameters_are_served(api: httpx.Client) -> None:
    for content_type in ("application/json", "application/json; charset=utf-8",
                         "Application/JSON"):
        r = api.post(CHAT, content=BODY, headers={"Content-Type": content_type})
        assert r.status_code == 200, (content_type, r.text)
    assert api.get("/health").status_code == 200  # GETs need no body type


def test_host_patterns() -> None:
    allowed = ["localhost", "127.0.0.1", "[::1]", ".example.com"]
    for host in ("localhost", "LOCALHOST:8000", "127.0.0.1:8000", "[::1]:8000", "example.com",
                 "api.example.com:443"):
        assert host_allowed(host, allowed), host
    for host in ("", "evil.com", "localhost.evil.com", "127.0.0.1.nip.io:8000", "badexample.com",
                 "[::2]:8000"):
        assert not host_allowed(host, allowed), host
    assert host_allowed("anything:1", ["*"])


def test_allowed_hosts_flag_guards_every_path() -> None:
    ns = build_parser().parse_args(["serve", "--allowed-hosts", "localhost", "127.0.0.1"])
    assert ns.allowed_hosts == ["localhost", "127.0.0.1"]
    assert build_parser().parse_args(["serve"]).allowed_hosts is None
    serve = next(a for a in build_parser()._subparsers._group_actions  # noqa: SLF001
                 if a.choices).choices["serve"]
    assert "--allowed-hosts" in serve.format_help() and "DNS-rebinding" in serve.format_help()
    app = FastAPI()

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    guarded = RequestGuards(app, allowed_hosts=ns.allowed_hosts)
    with TestClient(guarded, base_url="http://127.0.0.1:8000") as http:
        assert http.get("/health").status_code == 200
        r = http.get("/health", headers={"Host": "rebind.attacker.example:8000"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"
    with TestClient(RequestGuards(app), base_url="http://anything.example") as http:
        assert http.get("/health").status_code == 200  # no flag, no check
