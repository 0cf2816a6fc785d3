"""Limits on what a request may make the server do before it is turned away.

- Request bodies over `--max-request-body-bytes` get 413, by their Content-Length before any of
  the body is read, or as soon as a chunked body passes the limit.
- A prompt with more characters than any prompt of `max_model_len` tokens can have is refused
  before it is tokenized (tokenizing megabytes takes seconds of CPU).
- Bodies over `OFFLOAD_BYTES` are parsed, rendered and tokenized in the preparation thread, never
  on the event loop (/v1 and /tokenize alike).
"""

from __future__ import annotations

from typing import Any

from flatout.server.errors import OpenAIError

# bodies this large are prepared (parsed, rendered, tokenized, validated) off the event loop
OFFLOAD_BYTES = 64 * 1024


class BodySizeLimit:
    """Pure-ASGI middleware answering 413 for bodies over `max_bytes`."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> OpenAIError:
        return OpenAIError(f"request body is larger than this server's limit of {self.max_bytes} "
                           f"bytes", status=413, code="request_too_large")

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                await OpenAIError("invalid Content-Length header").response()(scope, receive, send)
                return
            if too_large:
                await self._too_large().response()(scope, receive, send)
                return
        received = 0

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()  # answered by the app's OpenAIError handler
            return message

        await self.app(scope, limited_receive, send)


def max_prompt_chars(tokenizer: Any, max_model_len: int) -> int | None:
    """The most characters a prompt that fits in `max_model_len` tokens can have: no token is
    longer than the longest vocabulary entry (byte-level entries spell each byte as one
    character, so they are at least as long as the text they stand for). Doubled as a margin for
    normalizers that shorten text. None when the tokenizer's vocabulary cannot be read."""
    try:
        longest = max(len(t) for t in tokenizer.get_vocab())
    except Exception:
        return None
    return 2 * max(longest, 1) * max_model_len


def check_prompt_chars(text: str, limit: int | None, param: str) -> None:
    if limit is not None and len(text) > limit:
        raise OpenAIError(
            f"the prompt has {len(text)} characters, more than any prompt that fits in this "
            f"model's context can have", param=param, code="context_length_exceeded")
