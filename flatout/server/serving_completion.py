"""POST /v1/completions: one engine request per prompt, each with n samples; choice index
`prompt_index * n + sample_index`, as OpenAI numbers them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from flatout.engine.outputs import CompletionOutput, OutputAccumulator, RequestOutput
from flatout.sampling_params import SamplingParams
from flatout.server.admission import Ticket
from flatout.server.errors import OpenAIError
from flatout.server.large_json import Deferred
from flatout.server.limits import check_prompt_chars
from flatout.server.protocol import (
    CompletionRequest,
    completion_prompts,
    completion_sampling_fields,
)
from flatout.server.responses import (
    EventStream,
    Generators,
    collect,
    completion_logprobs,
    new_id,
    now,
    unless_disconnected,
    usage,
)
from flatout.server.state import ServerState
from flatout.server.stream import stream_events


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
    ids_list: list[list[int]] = []
    echo: list[str] = []
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
        if not req.echo:
            echo.append("")
        elif isinstance(prompt, str):
            echo.append(prompt)
        else:  # token ids: without a tokenizer no text, as for the generated tokens
            echo.append("" if tok is None else tok.decode(prompt, skip_special_tokens=False))
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
        finals = await unless_disconnected(
            raw, collect(state, _generators(state, p, ticket), n, arrival))
        top = 1 + req.logprobs if req.logprobs is not None else 0
        tokens = sum(sum(r.num_tokens()) for r in finals)
        return await state.responses.json(lambda: _response(state, req, p, finals),
                                          entries=tokens * (1 + top))

    return await ticket.settle(respond())


def _generators(state: ServerState, p: _Prepared, ticket: Ticket) -> Generators:
    n = p.params.n
    return lambda: [
        state.client.generate(p.engine_id(i), ids, p.params, deadline=ticket.deadline,
                              on_started=ticket.on_started(n), on_too_slow=ticket.too_slow)
        for i, ids in enumerate(p.prompts)
    ]


def _response(
    state: ServerState, req: CompletionRequest, p: _Prepared, finals: list[OutputAccumulator]
) -> dict[str, Any]:
    n = p.params.n
    top_n = req.logprobs or 0
    choices = []
    for i, out in enumerate(_taken(r) for r in finals):
        for o in out.outputs:
            prefix = p.echo_texts[i]
            choices.append({
                "index": i * n + o.index,
                "text": prefix + o.text,
                "logprobs": Deferred(partial(completion_logprobs, state, o.logprobs or [],
                                             top_n, len(prefix)))
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


def _taken(request: OutputAccumulator) -> RequestOutput:
    out = request.result()
    request.release()
    return out


class _CompletionChoices:
    """A completion stream's choice fields: the new `text` (after the echoed prompt, on a
    choice's first chunk) and its logprobs, with offsets running on from the text sent."""

    def __init__(self, state: ServerState, req: CompletionRequest, p: _Prepared) -> None:
        self.state, self.req, self.p = state, req, p
        n = p.params.n
        num = len(p.prompts) * n
        self.echoed = [not p.echo_texts[k // n] for k in range(num)]
        self.offsets = [len(p.echo_texts[k // n]) for k in range(num)]
        # without a tokenizer the text stays empty: send a chunk per step of new tokens anyway,
        # so that clients (and `flatout bench`) still see when each token arrived
        self.textless = state.tokenizer is None

    def render(self, k: int, o: CompletionOutput) -> tuple[dict[str, Any], bool]:
        text = o.text
        if not self.echoed[k]:
            text, self.echoed[k] = self.p.echo_texts[k // self.p.params.n] + text, True
        new_lps = o.logprobs or []
        logprobs = None
        if self.req.logprobs is not None:
            logprobs = completion_logprobs(self.state, new_lps, self.req.logprobs,
                                           self.offsets[k])
            self.offsets[k] += sum(len(t) for t in logprobs["tokens"])
        worth_sending = bool(text or new_lps or (self.textless and o.token_ids))
        return {"text": text, "logprobs": logprobs}, worth_sending


def _stream(
    state: ServerState, req: CompletionRequest, p: _Prepared, arrival: float, ticket: Ticket
) -> AsyncIterator[str]:
    base = {"id": p.request_id, "object": "text_completion", "created": now(), "model": p.model}
    return stream_events(state, _generators(state, p, ticket), p.params.n,
                         _CompletionChoices(state, req, p), base=base,
                         include_usage=req.include_usage, ticket=ticket, arrival=arrival)
