"""POST /v1/completions: one engine request per prompt, each with n samples; choice index
`prompt_index * n + sample_index`, as OpenAI numbers them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from flatout.outputs import RequestOutput
from flatout.sampling_params import SamplingParams
from flatout.server.admission import Outcome, Ticket
from flatout.server.errors import OpenAIError
from flatout.server.limits import check_prompt_chars
from flatout.server.metrics import RequestTracker
from flatout.server.protocol import (
    CompletionRequest,
    completion_prompts,
    completion_sampling_fields,
)
from flatout.server.responses import (
    SSE_DONE,
    EventStream,
    completion_logprobs,
    ensure_finished,
    merge,
    new_id,
    now,
    sse,
    sse_error,
    unless_disconnected,
    usage,
)
from flatout.server.state import ServerState


@dataclass
class _Prepared:
    request_id: str
    model: str
    prompts: list[list[int]]
    echo_texts: list[str]  # prepended to each prompt's choices when echo is set
    params: SamplingParams

    def engine_id(self, i: int) -> str:
        return f"{self.request_id}-{i}"


def prepare_completion(state: ServerState, req: CompletionRequest) -> _Prepared:
    """Tokenize and validate every prompt before any is queued."""
    model = state.check_model(req.model)
    prompts = completion_prompts(req.prompt)
    params = state.client.default_sampling_params(**completion_sampling_fields(req))
    tok = state.tokenizer
    ids_list, echo = [], []
    for prompt in prompts:
        if isinstance(prompt, str):
            if tok is None:
                raise OpenAIError("this model has no tokenizer: send prompts as token ids",
                                  param="prompt")
            check_prompt_chars(prompt, state.max_prompt_chars, "prompt")
            ids = list(tok.encode(prompt))
        else:
            ids = list(prompt)
        state.client.inputs.validate(ids, params)
        ids_list.append(ids)
        if req.echo:
            echo.append(prompt if isinstance(prompt, str) or tok is None
                        else tok.decode(prompt, skip_special_tokens=False))
        else:
            echo.append("")
    return _Prepared(new_id("cmpl"), model, ids_list, echo, params)


async def create_completion(
    state: ServerState, req: CompletionRequest, raw: Request, *, offload: bool = False
) -> Response:
    arrival = time.monotonic()
    state.admission.check()  # turn away at once while overloaded, draining or without engine
    p = await state.prepare(prepare_completion, state, req, offload=offload)
    n = p.params.n
    ticket = state.admission.accept(len(p.prompts) * n, arrival)
    if req.stream:
        return EventStream(_stream(state, req, p, arrival, ticket), ticket)

    async def respond() -> Response:
        finals = await unless_disconnected(raw, _collect(state, p, arrival, ticket))
        return JSONResponse(_response(state, req, p, finals))

    return await ticket.settle(respond())


def _generators(
    state: ServerState, p: _Prepared, ticket: Ticket
) -> list[AsyncIterator[RequestOutput]]:
    n = p.params.n
    return [
        state.client.generate(p.engine_id(i), ids, p.params, deadline=ticket.deadline,
                              on_started=ticket.on_started(n))
        for i, ids in enumerate(p.prompts)
    ]


def _finish(trackers: list[RequestTracker], last: list[RequestOutput | None], n: int) -> None:
    for tracker, out in zip(trackers, last, strict=True):
        tracker.finish(out, n)


async def _collect(
    state: ServerState, p: _Prepared, arrival: float, ticket: Ticket
) -> list[RequestOutput]:
    trackers = [state.metrics.track(arrival) for _ in p.prompts]
    last: list[RequestOutput | None] = [None] * len(p.prompts)
    try:
        async for i, out in merge(_generators(state, p, ticket)):
            trackers[i].observe(out)
            last[i] = out
    finally:
        _finish(trackers, last, p.params.n)
    return [ensure_finished(out) for out in last]


def _response(
    state: ServerState, req: CompletionRequest, p: _Prepared, finals: list[RequestOutput]
) -> dict[str, Any]:
    n = p.params.n
    top_n = req.logprobs or 0
    choices = []
    for i, out in enumerate(finals):
        for o in out.outputs:
            prefix = p.echo_texts[i]
            choices.append({
                "index": i * n + o.index,
                "text": prefix + o.text,
                "logprobs": completion_logprobs(state, o.logprobs or [], top_n, len(prefix))
                if req.logprobs is not None else None,
                "finish_reason": o.finish_reason,
                "stop_reason": o.stop_reason,
            })
    return {
        "id": p.request_id,
        "object": "text_completion",
        "created": now(),
        "model": p.model,
        "choices": choices,
        "usage": usage(finals),
    }


async def _stream(
    state: ServerState, req: CompletionRequest, p: _Prepared, arrival: float, ticket: Ticket
) -> AsyncIterator[str]:
    n = p.params.n
    top_n = req.logprobs or 0
    base = {"id": p.request_id, "object": "text_completion", "created": now(), "model": p.model}
    if req.include_usage:
        base["usage"] = None
    num = len(p.prompts) * n
    sent_chars, sent_lps, done = [0] * num, [0] * num, [False] * num
    sent_tokens = [0] * num
    # without a tokenizer the text stays empty: send a chunk per step of new tokens anyway, so
    # that clients (and `flatout bench`) still see when each token arrived
    textless = state.tokenizer is None
    echoed = [not p.echo_texts[k // n] for k in range(num)]
    offsets = [len(p.echo_texts[k // n]) for k in range(num)]
    trackers = [state.metrics.track(arrival) for _ in p.prompts]
    last: list[RequestOutput | None] = [None] * len(p.prompts)
    try:
        async for i, out in merge(_generators(state, p, ticket)):
            trackers[i].observe(out)
            last[i] = out
            for o in out.outputs:
                k = i * n + o.index
                if done[k]:
                    continue
                text = o.text[sent_chars[k]:]
                if not echoed[k]:
                    text, echoed[k] = p.echo_texts[i] + text, True
                sent_chars[k] = len(o.text)
                new_lps = (o.logprobs or [])[sent_lps[k]:]
                sent_lps[k] += len(new_lps)
                finished = o.finish_reason is not None
                new_tokens = len(o.token_ids) - sent_tokens[k]
                sent_tokens[k] = len(o.token_ids)
                if not text and not finished and not new_lps and not (textless and new_tokens):
                    continue
                logprobs = None
                if req.logprobs is not None:
                    logprobs = completion_logprobs(state, new_lps, top_n, offsets[k])
                    offsets[k] += sum(len(t) for t in logprobs["tokens"])
                choice: dict[str, Any] = {
                    "index": k, "text": text, "logprobs": logprobs,
                    "finish_reason": o.finish_reason if finished else None,
                }
                if finished:
                    done[k] = True
                    choice["stop_reason"] = o.stop_reason
                yield sse({**base, "choices": [choice]})
        if req.include_usage:
            yield sse({**base, "choices": [], "usage": usage([o for o in last if o])})
        ticket.end(Outcome.COMPLETED)
        yield SSE_DONE
    except Exception as e:  # the engine died or refused the request, a timeout
        ticket.end(Outcome.ERROR)
        yield sse_error(e)
        yield SSE_DONE
    finally:
        _finish(trackers, last, p.params.n)
