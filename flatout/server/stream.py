"""The SSE stream of both endpoints: the engine's deltas of one API request (one or more engine
requests of `n` samples each) become one chunk per sample delta worth sending (the chunks of one
delta in one ASGI message), then the usage chunk (with `stream_options.include_usage`) and
`[DONE]`; an error mid-stream becomes an error chunk and `[DONE]`.

Each endpoint renders the fields of its choices (`ChoiceRenderer`): chat a `delta` message with
the reasoning split out, completions a `text`. The encoder frames them, numbers them (choice
`request_index * n + sample_index`), closes each choice once with its finish and stop reasons,
and skips deltas that carry nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from flatout.engine.messages import ConsumerTooSlowError
from flatout.engine.outputs import CompletionOutput
from flatout.server.admission import Outcome, Ticket
from flatout.server.responses import (
    SSE_DONE,
    ChunkFrame,
    Generators,
    RequestProgress,
    merge,
    sse,
    sse_error,
    usage,
)
from flatout.server.state import ServerState

_NO_LOGPROBS: dict[str, Any] = {"logprobs": None}


class ChoiceRenderer(Protocol):
    def render(self, k: int, delta: CompletionOutput) -> tuple[dict[str, Any], bool]:
        """Choice `k`'s fields for one sample delta (they go between `index` and
        `finish_reason`), and whether they carry anything (text, logprobs, a token) that is
        worth a chunk when the choice is not finishing."""
        ...


async def stream_events(
    state: ServerState, generators: Generators, n: int, renderer: ChoiceRenderer, *,
    base: dict[str, Any], include_usage: bool, ticket: Ticket, arrival: float,
    opening: list[dict[str, Any]] | None = None,
) -> AsyncIterator[str]:
    """The SSE events of a streamed request. `base`: the fields every chunk starts with;
    `opening`: choices sent first, each in its own chunk; `generators()` starts the engine
    requests."""
    if include_usage:
        base = {**base, "usage": None}
    gens = generators()  # nothing runs until the merge below iterates them
    progress = RequestProgress(state, len(gens), n, arrival, keep_outputs=False)
    frame = ChunkFrame(base)
    try:
        if opening:
            yield "".join(frame.event(first) for first in opening)
        done: set[int] = set()
        async for i, delta in merge(gens):
            progress.add(i, delta)
            # the chunks of one delta (its samples', a tool call's pieces) go out as one
            # message: one pass through the ASGI send path and one socket write for them all
            events: list[str] = []
            for o in delta.outputs:
                k = i * n + o.index
                if k in done:
                    continue
                finished = o.finish_reason is not None
                fields, worth_sending = renderer.render(k, o)
                if not worth_sending and not finished:
                    continue
                reason = fields.pop("finish_reason", o.finish_reason)
                # several deltas (a tool call's pieces) go out as chunks of their own
                delta_now = fields.pop("delta", None)
                deltas = fields.pop("deltas", None) or [delta_now]
                for j, piece in enumerate(deltas):
                    last = j == len(deltas) - 1
                    choice: dict[str, Any] = {"index": k}
                    if piece is not None:
                        choice["delta"] = piece
                    choice.update(fields if last else _NO_LOGPROBS)
                    choice["finish_reason"] = reason if finished and last else None
                    if finished and last:
                        done.add(k)
                        choice["stop_reason"] = o.stop_reason
                    events.append(frame.event(choice))
            if events:
                yield events[0] if len(events) == 1 else "".join(events)
        if include_usage:
            yield sse({**base, "choices": [], "usage": usage(progress.requests)})
        ticket.end(Outcome.COMPLETED)
        yield SSE_DONE
    except ConsumerTooSlowError:
        return  # the client stopped reading: already counted aborted, its connection dropped
    except Exception as e:  # the engine died or refused the request, a timeout
        ticket.end(Outcome.ERROR)
        yield sse_error(e)
        yield SSE_DONE
    finally:
        progress.finish()
