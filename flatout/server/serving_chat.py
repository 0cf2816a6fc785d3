"""POST /v1/chat/completions: template → tokens → engine → message (or SSE deltas), with the
reasoning split into `reasoning_content`."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from flatout.engine.messages import MultiModalItem
from flatout.engine.outputs import CompletionOutput, OutputAccumulator
from flatout.engine.reasoning_split import ReasoningTokens
from flatout.sampling_params import SamplingParams
from flatout.server.admission import Ticket
from flatout.server.errors import OpenAIError
from flatout.server.large_json import Deferred
from flatout.server.limits import check_prompt_chars
from flatout.server.media import ImageRef
from flatout.server.protocol import (
    ChatCompletionRequest,
    TokenizeRequest,
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
from flatout.server.structured import (
    ForcedToolCalls,
    ForcedToolStream,
    one_of,
    strict_tool_calls,
    strict_tools,
)
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
    forced_tools: ForcedToolCalls | None = None  # tool_choice required / a named function
    images: list[ImageRef] = field(default_factory=list)  # image parts, in prompt order
    mm_items: list[MultiModalItem] = field(default_factory=list)  # once they are decoded
    reasoning_tokens: ReasoningTokens | None = None  # the reasoning is split by the tags' ids
    max_tool_calls: int | None = None  # parallel_tool_calls false: 1


def prepare_chat(state: ServerState, req: ChatCompletionRequest) -> _Prepared:
    """Everything that can fail because of the request, before anything is queued."""
    model = state.check_model(req.model)
    refuse_unsupported(req)
    if req.tool_choice is not None and not req.tools:  # as OpenAI's, "none" too
        raise OpenAIError("Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                          "'tools' are specified", param="tool_choice")
    if req.tool_choice == "auto" and state.tool_parser is None:
        raise OpenAIError('tool_choice "auto" needs the server started with '
                          "--enable-auto-tool-choice --tool-call-parser NAME", param="tool_choice",
                          code="unsupported_parameter")
    parallel = req.parallel_tool_calls is not False
    forced = ForcedToolCalls.from_request(req.tool_choice, req.tools, parallel)
    model_calls = bool(req.tools) and req.tool_choice != "none" and forced is None
    tool_parser = state.tool_parser if model_calls else None
    # strict tools: the model's calls constrained (auto), or enforced anyway (required, named),
    # or asked nothing (none); a strict that is not a boolean is a 400 in every case
    strict = (strict_tool_calls(req.tools or [], state.tool_parser, parallel) if model_calls
              else None)
    strict_tools(req.tools)
    urls: list[tuple[str, str]] = []
    prompt = render_chat_prompt(state, req, urls)
    ids = state.renderer.encode(prompt)
    fields = chat_sampling_fields(req)
    parser = state.reasoning
    opened = parser is not None and parser.prompt_opens_reasoning(prompt)
    so = one_of(fields.get("structured_outputs"),
                forced.structured_outputs() if forced is not None else None, strict)
    if so is not None and opened:  # the grammar constrains the answer, after the reasoning
        so = dataclasses.replace(so, after_token_id=_reasoning_end_id(state, so.field))
    if so is not None:
        fields["structured_outputs"] = so
    params = state.client.default_sampling_params(**fields)
    state.client.inputs.validate(ids, params)
    # single-token tags are found by id, also where skip_special_tokens hides them from the text
    by_id = parser.reasoning_tokens(opened=opened) if parser is not None else None
    return _Prepared(new_id("chatcmpl"), model, ids, params, opened, req.top_logprobs or 0,
                     tool_parser, forced, [ImageRef(url, param) for url, param in urls],
                     reasoning_tokens=by_id, max_tool_calls=None if parallel else 1)


def _reasoning_end_id(state: ServerState, field: str) -> int:
    """The id of the reasoning's end tag, which must be one token for the engine to see it."""
    assert state.reasoning is not None
    tag = state.reasoning.end_tag
    ids = state.tokenizer.encode(tag, add_special_tokens=False) if state.tokenizer else []
    if len(ids) != 1:
        raise OpenAIError(f"{field}: structured output after reasoning needs {tag} to be one "
                          "token of the vocabulary, and it is not for this model", param=field,
                          code="unsupported_parameter")
    return int(ids[0])


async def attach_images(state: ServerState, p: _Prepared) -> None:
    """Fetch or read the request's images, decode them (thread pool) and expand its
    placeholders to their token counts; every error is a 400 raised before anything is queued,
    and a prompt the images' sizes (from their headers) make too long before any is decoded."""
    inputs = state.client.inputs
    pixels = await state.media.load(
        p.images, lambda sizes: inputs.check_image_sizes(p.prompt_token_ids, sizes, p.params))
    loop = asyncio.get_running_loop()
    ids, items = await loop.run_in_executor(state.media.pool, inputs.expand_images,
                                            p.prompt_token_ids, pixels)
    inputs.validate(ids, p.params)
    p.prompt_token_ids, p.mm_items = ids, items


def render_chat_prompt(state: ServerState, req: ChatCompletionRequest | TokenizeRequest,
                       image_urls: list[tuple[str, str]] | None = None) -> str:
    """The prompt text of a chat request's messages (roles checked, `developer` as `system`,
    text parts joined, each image part as the model's placeholder, its (url, param) appended to
    `image_urls`), refused when no prompt that long can fit the context. /tokenize renders its
    messages here too, so it counts what chat would send (images as one placeholder each: their
    token counts come from decoding them, which /tokenize does not do)."""
    assert req.messages is not None
    messages = chat_messages(req.messages, state.image_placeholder,
                             [] if image_urls is None else image_urls, state.content_format)
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
    return prompt


async def create_chat_completion(
    state: ServerState, req: ChatCompletionRequest, raw: Request, *, offload: bool = False
) -> Response:
    arrival = time.monotonic()
    state.admission.check()  # turn away at once while overloaded, draining or without engine
    p = await state.prepare(prepare_chat, state, req, offload=offload)
    if p.images:
        await attach_images(state, p)
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
                                          mm_items=p.mm_items, on_too_slow=ticket.too_slow,
                                          reasoning=p.reasoning_tokens)]


def _reasoning_stream(state: ServerState, p: _Prepared) -> ReasoningStream | None:
    """The text parser, unless the output processor splits the reasoning by id."""
    if state.reasoning is None or p.reasoning_tokens is not None:
        return None
    return state.reasoning.stream(opened=p.opened_reasoning)


def _message(
    state: ServerState, req: ChatCompletionRequest, p: _Prepared, o: CompletionOutput
) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": o.text}
    if state.reasoning is not None:
        if p.reasoning_tokens is not None:  # split by id: o.text is the answer already
            reasoning, content = o.reasoning, o.text
        else:
            reasoning, content = state.reasoning.split(o.text, opened=p.opened_reasoning)
        msg["content"] = content
        if req.return_reasoning:
            msg["reasoning_content"] = reasoning
    if p.forced_tools is not None:
        forced = p.forced_tools.parse(msg["content"])
        if forced:
            msg["content"] = None
            msg["tool_calls"] = [c.to_openai() for c in forced]
    elif p.tool_parser is not None:
        content, calls = p.tool_parser.parse(msg["content"])
        calls = calls[:p.max_tool_calls]
        if calls:
            msg["content"] = content or None
            msg["tool_calls"] = [c.to_openai() for c in calls]
    return msg


def _finish_reason(p: _Prepared, called: bool, reason: str | None) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call (`auto`, `required`), "stop" when
    `tool_choice` named the function (the call was not the model's choice)."""
    if not called:
        return reason
    named = p.forced_tools is not None and p.forced_tools.name is not None
    return "stop" if named else "tool_calls"


def _response(
    state: ServerState, req: ChatCompletionRequest, p: _Prepared, request: OutputAccumulator
) -> dict[str, Any]:
    out = request.result()
    request.release()
    choices = []
    for o in out.outputs:
        message = _message(state, req, p, o)
        choices.append({
            "index": o.index,
            "message": message,
            "logprobs": Deferred(partial(chat_logprobs, state, o.logprobs or [], p.top_logprobs))
            if req.logprobs else None,
            "finish_reason": _finish_reason(p, "tool_calls" in message, o.finish_reason),
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
        self.tool_streams: list[ToolCallStream | ForcedToolStream | None] = [
            ToolCallStream(p.tool_parser, p.max_tool_calls) if p.tool_parser
            else ForcedToolStream(p.forced_tools) if p.forced_tools else None
            for _ in range(p.params.n)]

    def render(self, k: int, o: CompletionOutput) -> tuple[dict[str, Any], bool]:
        finished = o.finish_reason is not None
        delta: dict[str, Any] = {}
        reasoning, content = o.reasoning or "", o.text  # split by id, or not split yet
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
        if tool_deltas:  # one chunk per tool-call piece after this delta's text, then the
            # finish reason in a chunk of its own with an empty delta, as OpenAI's
            fields["deltas"] = ([delta] if delta else []) + [
                {"tool_calls": [d]} for d in tool_deltas] + [{}]
            fields["finish_reason"] = _finish_reason(self.p, True, o.finish_reason)
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
