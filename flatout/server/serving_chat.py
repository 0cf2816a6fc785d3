"""POST /v1/chat/completions: template → tokens → engine → message (or SSE deltas), with the
reasoning split into `reasoning_content`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from flatout.engine.outputs import CompletionOutput, OutputAccumulator
from flatout.sampling_params import SamplingParams
from flatout.server.admission import Ticket
from flatout.server.errors import OpenAIError
from flatout.server.limits import check_prompt_chars
from flatout.server.protocol import (
    ChatCompletionRequest,
    chat_messages,
    chat_sampling_fields,
    refuse_unsupported,
)
from flatout.server.reasoning import ReasoningStream
from flatout.server.responses import (
    EventStream,
    Generators,
    chat_logprobs,
    collect,
    new_id,
    now,
    unless_disconnected,
    usage,
)
from flatout.server.state import ServerState
from flatout.server.stream import stream_events
from flatout.server.tool_parsers import ToolCallStream, ToolParser


@dataclass
class _Prepared:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    params: SamplingParams
    opened_reasoning: bool  # the template ended the prompt inside <think>
    top_logprobs: int
    tool_parser: ToolParser | None = None  # the request has tools and may call them


def prepare_chat(state: ServerState, req: ChatCompletionRequest) -> _Prepared:
    """Everything that can fail because of the request, before anything is queued."""
    model = state.check_model(req.model)
    refuse_unsupported(req)
    if req.tool_choice == "auto" and state.tool_parser is None:
        raise OpenAIError('tool_choice "auto" needs the server started with '
                          "--enable-auto-tool-choice --tool-call-parser NAME", param="tool_choice",
                          code="unsupported_parameter")
    tool_parser = state.tool_parser if req.tools and req.tool_choice != "none" else None
    messages = chat_messages(req.messages)
    kwargs = dict(req.chat_template_kwargs or {})
    if req.enable_thinking is not None:
        kwargs.setdefault("enable_thinking", req.enable_thinking)
    prompt = state.renderer.render(
        messages,
        add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
        continue_final_message=req.continue_final_message,
        tools=req.tools,
        template_kwargs=kwargs,
    )
    check_prompt_chars(prompt, state.max_prompt_chars, "messages")
    ids = state.renderer.encode(prompt)
    fields = chat_sampling_fields(req)
    parser = state.reasoning
    if parser is not None and "skip_special_tokens" not in fields and parser.tags_are_special(
        state.tokenizer
    ):
        fields["skip_special_tokens"] = False  # keep the tags in the text so they can be split
    params = state.client.default_sampling_params(**fields)
    state.client.inputs.validate(ids, params)
    opened = parser is not None and parser.prompt_opens_reasoning(prompt)
    return _Prepared(new_id("chatcmpl"), model, ids, params, opened, req.top_logprobs or 0,
                     tool_parser)


async def create_chat_completion(
    state: ServerState, req: ChatCompletionRequest, raw: Request, *, offload: bool = False
) -> Response:
    arrival = time.monotonic()
    state.admission.check()  # turn away at once while overloaded, draining or without engine
    p = await state.prepare(prepare_chat, state, req, offload=offload)
    ticket = state.admission.accept(p.params.n, arrival)
    if req.stream:
        return EventStream(_stream(state, req, p, arrival, ticket), ticket)

    async def respond() -> Response:
        finals = await unless_disconnected(
            raw, collect(state, _generators(state, p, ticket), p.params.n, arrival))
        top = 1 + p.top_logprobs if req.logprobs else 0
        return await state.responses.json(lambda: _response(state, req, p, finals[0]),
                                          entries=sum(finals[0].num_tokens()) * (1 + top))

    return await ticket.settle(respond())


def _generators(state: ServerState, p: _Prepared, ticket: Ticket) -> Generators:
    return lambda: [state.client.generate(p.request_id, p.prompt_token_ids, p.params,
                                          deadline=ticket.deadline,
                                          on_started=ticket.on_started(p.params.n),
                                          on_too_slow=ticket.too_slow)]


def _reasoning_stream(state: ServerState, p: _Prepared) -> ReasoningStream | None:
    return state.reasoning.stream(opened=p.opened_reasoning) if state.reasoning else None


def _message(
    state: ServerState, req: ChatCompletionRequest, p: _Prepared, o: CompletionOutput
) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": o.text}
    if state.reasoning is not None:
        reasoning, content = state.reasoning.split(o.text, opened=p.opened_reasoning)
        msg["content"] = content
        if req.return_reasoning:
            msg["reasoning_content"] = reasoning
    if p.tool_parser is not None:
        content, calls = p.tool_parser.parse(msg["content"])
        if calls:
            msg["content"] = content or None
            msg["tool_calls"] = [c.to_openai() for c in calls]
    return msg


def _response(
    state: ServerState, req: ChatCompletionRequest, p: _Prepared, request: OutputAccumulator
) -> dict[str, Any]:
    out = request.result()
    choices = []
    for o in out.outputs:
        message = _message(state, req, p, o)
        choices.append({
            "index": o.index,
            "message": message,
            "logprobs": chat_logprobs(state, o.logprobs or [], p.top_logprobs)
            if req.logprobs else None,
            "finish_reason": "tool_calls" if "tool_calls" in message else o.finish_reason,
            "stop_reason": o.stop_reason,
        })
    return {
        "id": p.request_id,
        "object": "chat.completion",
        "created": now(),
        "model": p.model,
        "choices": choices,
        "usage": usage([request]),
    }


class _ChatChoices:
    """A chat stream's choice fields: a `delta` message, the reasoning split out of the text."""

    def __init__(self, state: ServerState, req: ChatCompletionRequest, p: _Prepared) -> None:
        self.state, self.req, self.p = state, req, p
        self.splitters = [_reasoning_stream(state, p) for _ in range(p.params.n)]
        self.tool_streams = [ToolCallStream(p.tool_parser) if p.tool_parser else None
                             for _ in range(p.params.n)]

    def render(self, k: int, o: CompletionOutput) -> tuple[dict[str, Any], bool]:
        finished = o.finish_reason is not None
        delta: dict[str, Any] = {}
        reasoning, content = "", o.text
        splitter = self.splitters[k]
        if splitter is not None:
            reasoning, content = splitter.feed(o.text)
            if finished:
                r, c = splitter.finish()
                reasoning, content = reasoning + r, content + c
        tool_deltas: list[dict[str, Any]] = []
        tools = self.tool_streams[k]
        if tools is not None:
            content = tools.feed(content)
            if finished:
                rest, tool_deltas = tools.finish()
                content += rest
        if reasoning and self.req.return_reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        new_lps = o.logprobs or []
        logprobs = (chat_logprobs(self.state, new_lps, self.p.top_logprobs)
                    if self.req.logprobs else None)
        fields: dict[str, Any] = {"delta": delta, "logprobs": logprobs}
        if tool_deltas:  # one chunk per tool-call piece after this delta's text
            fields["deltas"] = ([delta] if delta else []) + [
                {"tool_calls": [d]} for d in tool_deltas]
            fields["finish_reason"] = "tool_calls"
        return fields, bool(delta) or bool(self.req.logprobs and new_lps)


def _stream(
    state: ServerState, req: ChatCompletionRequest, p: _Prepared, arrival: float, ticket: Ticket
) -> AsyncIterator[str]:
    base = {"id": p.request_id, "object": "chat.completion.chunk", "created": now(),
            "model": p.model}
    opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None} for i in range(p.params.n)]
    return stream_events(state, _generators(state, p, ticket), p.params.n,
                         _ChatChoices(state, req, p), base=base,
                         include_usage=req.include_usage, ticket=ticket, arrival=arrival,
                         opening=opening)
