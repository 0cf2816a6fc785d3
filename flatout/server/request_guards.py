"""Checks that keep a web page in the user's browser from driving a local server.

A page can make the browser POST to http://127.0.0.1:8000 (a "simple" cross-origin request:
no preflight, no Authorization header) as long as the body is form data or text/plain, and a
DNS-rebinding page can even read the answers, its own host name in the Host header. So:

- POST bodies must be `application/json` (415 otherwise): a browser only sends that type
  cross-origin after a CORS preflight, which this server never approves.
- With `--allowed-hosts`, the Host header must name one of the hosts (400 otherwise), which a
  rebinding page cannot fake. `*` allows any; `.example.com` allows example.com and its
  subdomains.
"""

from __future__ import annotations

from typing import Any

from flatout.server.errors import OpenAIError


def _host_name(host: str) -> str:
    """The host part of a Host header, lower case, without the port (`[::1]:8000` -> `::1`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def host_allowed(host: str, allowed: list[str]) -> bool:
    name = _host_name(host)
    for pattern in allowed:
        p = pattern.strip().lower()
        if p == "*" or name == p.strip("[]"):
            return True
        if p.startswith(".") and (name == p[1:] or name.endswith(p)):
            return True
    return False


def is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json"


class RequestGuards:
    """Pure-ASGI middleware: the Host check (when `allowed_hosts`) and JSON-only POST bodies."""

    def __init__(self, app: Any, allowed_hosts: list[str] | None = None) -> None:
        self.app = app
        self.allowed_hosts = list(allowed_hosts) if allowed_hosts else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
            if not host_allowed(host, self.allowed_hosts):
                err = OpenAIError(f"Host header {host[:100]!r} is not one of this server's "
                                  f"--allowed-hosts", code="invalid_host")
                await err.response()(scope, receive, send)
                return
        if scope.get("method") == "POST":
            content_type = headers.get(b"content-type", b"").decode("latin-1")
            if not is_json(content_type):
                got = repr(content_type[:100]) if content_type else "none"
                err = OpenAIError(f"request bodies must be sent as Content-Type: "
                                  f"application/json (got {got})", status=415,
                                  code="unsupported_media_type")
                await err.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)
