"""Non-streamed responses whose size grows with the request (n x max_tokens x top_logprobs can
make hundreds of MB of JSON) are built, encoded and written without one long step of the event
loop, so that /health and every stream keep being served meanwhile:

- built and encoded in a thread of their own (one, so that at most one such job competes with
  the event loop for the GIL);
- encoded piece by piece: the C encoder holds the GIL for the whole of one `json.dumps` call, so
  the members of the top three levels (the response object, its `choices`, each choice) and
  each token of a deferred value are encoded one at a time, the GIL changing hands between them;
- the bulk (each choice's logprobs) built only when its piece is encoded (`Deferred`) and freed
  right after: the objects of a whole response never live at once, so the collector's full
  passes, which scan every live container and hold the GIL meanwhile, stay short (building all
  of a 22 MB response first took passes of 40-70 ms in the building thread);
- written in pieces of about 1 MiB (with a Content-Length), each `send` waiting for the socket
  to drain, instead of one write that the event loop would copy and buffer whole.

The bytes equal JSONResponse's (compact separators, UTF-8, NaN refused).
"""

from __future__ import annotations

import asyncio
import gc
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from starlette.responses import JSONResponse, Response

T = TypeVar("T")

OFFLOAD_ENTRIES = 4096  # generated tokens x (1 + top logprobs) above which a response moves off
PIECE_BYTES = 1 << 20


class Deferred:
    """A value of a response built when it is encoded (`build()`), so that it lives only
    while its piece of the JSON is written."""

    __slots__ = ("_build",)

    def __init__(self, build: Callable[[], Any]) -> None:
        self._build: Callable[[], Any] | None = build

    def take(self) -> Any:
        """The value, built once; what the builder holds (a choice's logprobs) is let go, so
        that it is freed piece by piece as the response is encoded, not all at the end."""
        build, self._build = self._build, None
        if build is None:
            raise RuntimeError("a deferred response value is encoded once")
        return build()


def _default(obj: Any) -> Any:
    if isinstance(obj, Deferred):
        return obj.take()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


_encode = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                           default=_default).encode


def encode(obj: Any) -> bytes:
    """`obj` as JSON in one piece (as JSONResponse encodes it), Deferred values built."""
    return _encode(obj).encode()


def encode_pieces(obj: Any, piece_bytes: int = PIECE_BYTES) -> list[bytes]:
    """`obj` as JSON (as JSONResponse encodes it), in UTF-8 pieces of about `piece_bytes`."""
    parts: list[str] = []
    _encode_into(obj, parts)
    pieces: list[bytes] = []
    buf: list[str] = []
    size = 0
    for part in parts:
        buf.append(part)
        size += len(part)
        if size >= piece_bytes:
            pieces.append("".join(buf).encode())
            buf, size = [], 0
    if buf or not pieces:
        pieces.append("".join(buf).encode())
    return pieces


SPLIT_LEVELS = 3  # the response, its choices, each choice's members: one part each
DEFERRED_SPLIT_LEVELS = 2  # a deferred value (logprobs) and its members: a part per token


def _encode_into(obj: Any, parts: list[str], levels: int = SPLIT_LEVELS) -> None:
    """Append `obj`'s JSON to `parts`, containers `levels` deep split into their members (the
    GIL can change hands between parts; one part is one C encoder call)."""
    if levels > 0 and isinstance(obj, dict) and obj:
        opening = "{"
        for key, value in obj.items():
            if not isinstance(key, str):
                raise TypeError(f"JSON object keys must be strings, got {type(key).__name__}")
            parts.append(opening + _encode(key) + ":")
            _encode_into(value, parts, levels - 1)
            opening = ","
        parts.append("}")
    elif levels > 0 and isinstance(obj, list) and obj:
        opening = "["
        for item in obj:
            parts.append(opening)
            _encode_into(item, parts, levels - 1)
            opening = ","
        parts.append("]")
    elif isinstance(obj, Deferred):
        _encode_into(obj.take(), parts, DEFERRED_SPLIT_LEVELS)
    else:
        parts.append(_encode(obj))


class PiecewiseJSONResponse(Response):
    """A JSON body already encoded in pieces, sent one piece per ASGI message."""

    media_type = "application/json"

    def __init__(self, pieces: list[bytes], status_code: int = 200) -> None:
        self.pieces = pieces
        length = sum(len(p) for p in pieces)
        super().__init__(status_code=status_code, headers={"content-length": str(length)})

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        last = len(self.pieces) - 1
        for i, piece in enumerate(self.pieces):
            await send({"type": "http.response.body", "body": piece, "more_body": i < last})


def _without_collector(fn: Callable[[], T]) -> T:
    """fn() with the cyclic collector paused: building a response makes and frees (by
    reference counting) millions of small containers, which set off a full collection every
    few thousand; each of them held the GIL 30-60 ms over what the process holds (22+ passes
    for an 87 MB response). What the event loop makes meanwhile is collected afterwards."""
    if not gc.isenabled():
        return fn()
    gc.disable()
    try:
        return fn()
    finally:
        gc.enable()


class ResponseBuilder:
    """Builds JSON responses: small ones inline, large ones (`entries` > OFFLOAD_ENTRIES) in
    its thread."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flatout-respond")

    async def json(self, build: Callable[[], dict[str, Any]], entries: int) -> Response:
        """The response `build()` makes; `entries`: its generated tokens x (1 + top
        logprobs), what its building and encoding cost grows with."""
        if entries <= OFFLOAD_ENTRIES:
            return Response(encode(build()), media_type=JSONResponse.media_type)
        pieces = await asyncio.get_running_loop().run_in_executor(
            self._pool, _without_collector, lambda: encode_pieces(build()))
        return PiecewiseJSONResponse(pieces)
