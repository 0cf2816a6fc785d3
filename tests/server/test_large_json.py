"""Piecewise JSON encoding of large responses: the same bytes as JSONResponse, in pieces."""

from __future__ import annotations

import asyncio
import math
import weakref
from typing import Any

import pytest
from starlette.responses import JSONResponse

from flatout.server.large_json import (
    Deferred,
    PiecewiseJSONResponse,
    ResponseBuilder,
    encode,
    encode_pieces,
)

SAMPLE: dict[str, Any] = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "empty": {}, "none": [],
    "choices": [{"index": i, "message": {"role": "assistant", "content": f"héllo ☃ {i}\n\"q\""},
                 "logprobs": {"content": [{"token": "a", "logprob": -0.5, "bytes": [97],
                                           "top_logprobs": []}] * 50},
                 "finish_reason": None} for i in range(40)],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2000, "nested": [[1, 2], {"x": 1.5}]},
}


@pytest.mark.parametrize("obj", [SAMPLE, {}, [], [1, [2, {}], "x"], "text", 1.25, None])
def test_same_bytes_as_jsonresponse(obj: Any) -> None:
    pieces = encode_pieces(obj, piece_bytes=1000)
    assert b"".join(pieces) == JSONResponse(obj).body


def test_pieces_are_bounded() -> None:
    pieces = encode_pieces(SAMPLE, piece_bytes=1000)
    assert len(pieces) > 10
    # a piece ends at the first member boundary past the size (one choice at most beyond it)
    choice = len(encode_pieces(SAMPLE["choices"][0])[0])
    assert all(len(p) < 1000 + choice + 100 for p in pieces)


def test_nan_is_refused_as_jsonresponse_refuses_it() -> None:
    with pytest.raises(ValueError):
        encode_pieces({"choices": [{"logprob": math.nan}]})


def test_response_sends_each_piece_with_the_whole_length() -> None:
    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    pieces = encode_pieces(SAMPLE, piece_bytes=4096)
    asyncio.run(PiecewiseJSONResponse(pieces)({"type": "http"}, None, send))
    start, *bodies = messages
    headers = dict(start["headers"])
    assert headers[b"content-length"] == str(len(b"".join(pieces))).encode()
    assert headers[b"content-type"] == b"application/json"
    assert [m["body"] for m in bodies] == pieces
    assert [m["more_body"] for m in bodies] == [True] * (len(pieces) - 1) + [False]


def test_builder_offloads_only_large_responses() -> None:
    builder = ResponseBuilder()
    threads: list[str] = []

    def build() -> dict[str, Any]:
        import threading

        threads.append(threading.current_thread().name)
        return SAMPLE

    async def main() -> tuple[Any, Any]:
        return await builder.json(build, entries=10), await builder.json(build, entries=10**6)

    small, large = asyncio.run(main())
    assert not isinstance(small, PiecewiseJSONResponse)
    assert isinstance(large, PiecewiseJSONResponse)
    assert small.body == JSONResponse(SAMPLE).body
    assert threads[0] == "MainThread" and threads[1].startswith("flatout-respond")
    assert b"".join(large.pieces) == small.body


def _deferred_sample(built: list[int], alive: list[weakref.ref[Any]]) -> dict[str, Any]:
    """SAMPLE with each choice's logprobs (and one top-level member) deferred; each build
    is recorded, and a weak reference to what it built kept."""

    class Logprobs(dict):  # type: ignore[type-arg]  # a dict that can be weakly referenced
        pass

    def deferred(i: int, value: Any) -> Deferred:
        def build() -> Any:
            built.append(i)
            obj = Logprobs(value)
            alive.append(weakref.ref(obj))
            assert sum(r() is not None for r in alive) == 1, "a previous build is still alive"
            return obj
        return Deferred(build)

    sample = dict(SAMPLE)
    sample["choices"] = [dict(c, logprobs=deferred(i, c["logprobs"]))
                         for i, c in enumerate(SAMPLE["choices"])]
    sample["usage"] = deferred(-1, SAMPLE["usage"])
    return sample


@pytest.mark.parametrize("piecewise", [True, False])
def test_deferred_values_are_built_once_when_encoded_and_freed_after(piecewise: bool) -> None:
    built: list[int] = []
    alive: list[weakref.ref[Any]] = []
    obj = _deferred_sample(built, alive)
    body = b"".join(encode_pieces(obj, piece_bytes=1000)) if piecewise else encode(obj)
    assert body == JSONResponse(SAMPLE).body
    assert built == [*range(len(SAMPLE["choices"])), -1]
    assert all(r() is None for r in alive)


def test_other_objects_are_still_refused() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        encode({"x": object()})
