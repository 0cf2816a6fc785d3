"""Request bodies of the OpenAI-compatible API, and their translation to SamplingParams.

Bodies are validated strictly (a string is not a number, 1.5 is not an integer, NaN and Infinity
are not numbers), so a client mistake becomes a 400 naming the field rather than a silent
coercion. Ranges are declared on the fields, so /openapi.json states what is accepted. Unknown
fields are ignored, as OpenAI's clients expect: they send parameters a given server may not know.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from flatout.sampling_params import SamplingParams
from flatout.server.errors import OpenAIError, from_validation_error
from flatout.server.structured import (
    from_guided,
    from_response_format,
    from_structured_outputs,
    one_of,
)

MAX_MESSAGES = 2048  # messages in one chat request
MAX_STOP = 64  # stop strings, and stop token ids, in one request
MAX_PROMPTS = 2048  # prompts in one completions request

Role = Literal["system", "user", "assistant", "tool", "observation", "developer"]
_ROLES: tuple[str, ...] = get_args(Role)

NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenId = Annotated[int, Field(ge=0)]
SP = SamplingParams  # the ranges below are SamplingParams' own (validated there too)
Seed = Annotated[int, Field(ge=SP.MIN_SEED, le=SP.MAX_SEED)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


B = TypeVar("B", bound=BaseModel)


def validate_body(model: type[B], body: bytes | bytearray) -> B:
    """`body` validated as `model` (a 400 naming the field otherwise)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        raise from_validation_error(e) from None


class StreamOptions(_Body):
    include_usage: bool = False


class ImageURL(_Body):
    url: str  # data:image/...;base64,... (or a local file, where the server allows them)
    detail: Literal["auto", "low", "high"] | None = None  # accepted; images keep their size


class ContentPart(_Body):
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False,
                              json_schema_extra={"required": ["type"]})
    # other parts: 400, never fetched; image_url parts only for vision models
    type: str = Field(json_schema_extra={"enum": ["text", "image_url"]})
    text: Annotated[str | None, WithJsonSchema({"type": "string"})] = None
    image_url: ImageURL | None = None


def _message_schema(schema: dict[str, Any]) -> None:
    """OpenAI's rule, which chat_messages checks: `content` (a string or parts, not null) is
    required, except in an assistant message that carries `tool_calls` (an array) or a
    `refusal` (a string) instead."""
    content = {"anyOf": [c for c in schema["properties"]["content"]["anyOf"]
                         if c.get("type") != "null"]}
    tool_calls = {"anyOf": [{"type": "array", "items": {"type": "object"}}, {"type": "null"}]}
    schema["anyOf"] = [
        {"properties": {"role": {"enum": [r for r in _ROLES if r != "assistant"]},
                        "content": content}, "required": ["content"]},
        {"properties": {"role": {"const": "assistant"}, "tool_calls": tool_calls}, "anyOf": [
            {"properties": {"content": content}, "required": ["content"]},
            {"properties": {"tool_calls": {"type": "array"}}, "required": ["tool_calls"]},
            {"properties": {"refusal": {"type": "string"}}, "required": ["refusal"]}]},
    ]


class ChatMessage(_Body):
    # extra keys (name, metadata, tool_calls, tool_call_id, reasoning_content) reach the template
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False,
                              json_schema_extra=_message_schema)
    role: str = Field(json_schema_extra={"enum": list(_ROLES)})  # checked in chat_messages
    content: str | list[ContentPart] | None = None

    def check_content(self, param: str) -> None:
        """A 400 naming `param` (the message) where it lacks the content its role needs."""
        if self.content is not None:
            return
        extra = self.model_extra or {}
        if self.role != "assistant":
            raise OpenAIError(f"{param}.content is required in a {self.role} message",
                              param=f"{param}.content")
        # tool_calls that are not an array: history_tool_calls' 400 names them
        if extra.get("tool_calls") is None and not isinstance(extra.get("refusal"), str):
            raise OpenAIError(f"{param}.content is required in an assistant message without "
                              "tool_calls or refusal", param=f"{param}.content")


class _SamplingFields(_Body):
    """Fields both endpoints share: OpenAI's, plus the extras vLLM users send."""

    model: str | None = None
    n: int = Field(1, ge=1, le=SP.MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=SP.MAX_TEMPERATURE)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP)] | None = None
    presence_penalty: float | None = Field(None, ge=-SP.MAX_PENALTY, le=SP.MAX_PENALTY)
    frequency_penalty: float | None = Field(None, ge=-SP.MAX_PENALTY, le=SP.MAX_PENALTY)
    max_tokens: int | None = Field(None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # token id (as a string, JSON's keys are) -> bias added to its logit
    logit_bias: dict[
        Annotated[str, Field(pattern=r"^[0-9]{1,19}$")],
        Annotated[float, Field(ge=-SP.MAX_LOGIT_BIAS, le=SP.MAX_LOGIT_BIAS)],
    ] | None = Field(None, max_length=SP.MAX_LOGIT_BIAS_TOKENS)
    # vLLM extras
    top_k: int | None = Field(None, ge=SP.MIN_TOP_K)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, ge=SP.MIN_REPETITION_PENALTY,
                                              le=SP.MAX_REPETITION_PENALTY)
    min_tokens: int | None = Field(None, ge=0)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    stop_token_ids: Annotated[list[Annotated[int, Field(ge=0, le=SP.MAX_TOKEN_ID)]],
                              Field(max_length=MAX_STOP)] | None = None
    include_stop_str_in_output: bool | None = None
    # structured output (server/structured.py): at most one of these per request
    response_format: Any = Field(None, description='`{"type": "text"}`, `{"type": '
                                 '"json_object"}` or `{"type": "json_schema", "json_schema": '
                                 '{"name": ..., "schema": {...}}}`: the output follows it')
    structured_outputs: dict[str, Any] | None = Field(
        None, description="vLLM's: one of json (a schema), regex, choice (strings), grammar "
        "(EBNF), json_object")
    guided_json: dict[str, Any] | str | None = Field(None, description="vLLM's: a JSON schema")
    guided_regex: str | None = Field(None, description="vLLM's: a regular expression")
    guided_choice: list[str] | None = Field(None, description="vLLM's: one of these strings")
    guided_grammar: str | None = Field(None, description="vLLM's: an EBNF grammar")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=SP.MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = Field(
        None, description="function tools; `function.strict: true` under tool_choice `auto` "
        "constrains the model's calls to the schema (hermes, llama3_json parsers; a 400 with "
        "the others)")
    tool_choice: Any = Field(None, description="`none`, `auto`, `required` or `{\"type\": "
                             "\"function\", \"function\": {\"name\": ...}}` (the last two "
                             "enforced by a grammar); only with `tools` (a 400 without)")
    parallel_tool_calls: bool | None = Field(None, description="false: at most one tool call "
                                             "per reply (default: any number)")
    # OpenAI fields flatout does not implement: a value that asks for them is a 400 naming the
    # field (refuse_unsupported), never silently ignored
    modalities: Any = Field(None, description='only ["text"]')
    store: Any = Field(None, description="only false")
    service_tier: Any = Field(None, description="only `auto` or `default`")
    audio: Any = Field(None, description="not supported (400 when set)")
    prediction: Any = Field(None, description="not supported (400 when set)")
    web_search_options: Any = Field(None, description="not supported (400 when set)")
    functions: Any = Field(None, description="not supported (400 when set): use tools")
    function_call: Any = Field(None, description="not supported (400 when set): use tool_choice")
    reasoning_effort: Any = Field(None, description="not supported (400 when set)")
    verbosity: Any = Field(None, description="not supported (400 when set)")
    # chat-template controls
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    enable_thinking: bool | None = None  # top-level, as LangChain's extra_body sends it
    return_reasoning: bool = True


class TokenizeRequest(_Body):
    """`POST /tokenize` (vLLM's shape): a prompt, or messages rendered as chat renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1, max_length=MAX_MESSAGES)
    # default: true for a prompt, false for messages (the template writes the special tokens)
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None


class DetokenizeRequest(_Body):
    """`POST /detokenize` (vLLM's shape): token ids, strictly integers (1.0 and "1" are not)."""

    model: str | None = None
    tokens: list[TokenId]


_TOKEN_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
# checked by completion_prompts (clearer errors than a four-way union's), described here
PromptInput = Annotated[
    str | list[str] | list[int] | list[list[int]],
    WithJsonSchema({"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1,
         "maxItems": MAX_PROMPTS},
        _TOKEN_IDS,
        {"type": "array", "items": _TOKEN_IDS, "minItems": 1, "maxItems": MAX_PROMPTS},
    ]}),
]


class CompletionRequest(_SamplingFields):
    prompt: PromptInput
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=SP.MAX_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


# -- translation ---------------------------------------------------------------------------------
# request fields copied as they are into SamplingParams when the client set them
_PASSTHROUGH = (
    "n", "temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "skip_special_tokens",
    "spaces_between_special_tokens", "stop_token_ids", "include_stop_str_in_output",
)


def sampling_fields(req: _SamplingFields) -> dict[str, Any]:
    """The SamplingParams fields the request set explicitly (generation_config.json defaults
    apply under them). An absent max_tokens means: up to the context length, as OpenAI's."""
    fields = {
        name: getattr(req, name)
        for name in _PASSTHROUGH
        if name in req.model_fields_set and getattr(req, name) is not None
    }
    fields["max_tokens"] = req.max_tokens
    if req.logit_bias:
        fields["logit_bias"] = {int(tid): bias for tid, bias in req.logit_bias.items()}
    guided = {name: getattr(req, name) for name in ("guided_json", "guided_regex",
                                                    "guided_choice", "guided_grammar")}
    so = one_of(from_response_format(req.response_format),
                from_structured_outputs(req.structured_outputs), *from_guided(guided))
    if so is not None:
        fields["structured_outputs"] = so
    return fields


# field -> the values that ask nothing of the server (None, the field's absence, always does)
_UNSUPPORTED_CHAT: dict[str, tuple[object, ...]] = {
    "modalities": (["text"],),
    "store": (False,),
    "service_tier": ("auto", "default"),
    "audio": (), "prediction": (), "web_search_options": (), "functions": (),
    "function_call": (), "reasoning_effort": (), "verbosity": (),
}


def refuse_unsupported(req: ChatCompletionRequest) -> None:
    """A 400 naming the first field set to something flatout does not do."""
    for name, accepted in _UNSUPPORTED_CHAT.items():
        value = getattr(req, name)
        if value is None or any(type(value) is type(a) and value == a for a in accepted):
            continue
        hint = f" (accepted: {', '.join(map(repr, accepted))})" if accepted else ""
        raise OpenAIError(f"{name}={value!r:.80} is not supported by this server{hint}",
                          param=name, code="unsupported_parameter")


def chat_sampling_fields(req: ChatCompletionRequest) -> dict[str, Any]:
    fields = sampling_fields(req)
    if req.max_completion_tokens is not None:
        fields["max_tokens"] = req.max_completion_tokens
    if req.top_logprobs is not None and not req.logprobs:
        raise OpenAIError("top_logprobs requires logprobs to be true", param="top_logprobs")
    if req.logprobs:
        fields["logprobs"] = req.top_logprobs or 0
    return fields


def completion_sampling_fields(req: CompletionRequest) -> dict[str, Any]:
    fields = sampling_fields(req)
    if req.logprobs is not None:
        fields["logprobs"] = req.logprobs
    if req.best_of is not None and req.best_of != req.n:
        raise OpenAIError("best_of other than n is not supported", param="best_of")
    if req.suffix:
        raise OpenAIError("suffix is not supported", param="suffix")
    if req.echo and req.logprobs is not None:
        raise OpenAIError("echo together with logprobs is not supported", param="echo")
    return fields


def completion_prompts(prompt: PromptInput) -> list[str | list[int]]:
    """Normalise the four accepted prompt shapes to a list of prompts."""
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif not prompt:
        raise OpenAIError("prompt must not be empty", param="prompt")
    elif isinstance(prompt[0], int):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if len(prompts) > MAX_PROMPTS:
        raise OpenAIError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}",
                          param="prompt", code="invalid_value")
    for p in prompts:
        if len(p) == 0:
            raise OpenAIError("prompt must not be empty", param="prompt")
    return prompts


def chat_messages(
    messages: list[ChatMessage],
    image_placeholder: str | None = None,
    image_urls: list[tuple[str, str]] | None = None,
    content_format: str = "string",
) -> list[dict[str, Any]]:
    """Messages as the chat template expects them, extra keys kept. content_format "string":
    content as one string (text parts joined by newlines, each image as `image_placeholder`);
    "openai": content parts stay a list, [{"type": "text", "text": ...} | {"type": "image"}],
    for templates that place images themselves (GLM-4.1V's own). A vision model passes
    `image_placeholder` and a list that receives each image part's (url, param), in order;
    other models refuse image parts."""
    if not messages:
        raise OpenAIError("messages must not be empty", param="messages")
    out = []
    for i, m in enumerate(messages):
        if m.role not in _ROLES:
            raise OpenAIError(
                f"messages[{i}].role must be one of {', '.join(sorted(_ROLES))}, got {m.role!r}",
                param=f"messages[{i}].role",
            )
        m.check_content(f"messages[{i}]")
        msg = m.model_dump(exclude_none=True)
        if m.role == "developer":  # OpenAI's newer name for the system role
            msg["role"] = "system"
        content = m.content
        if isinstance(content, list):
            parts: list[dict[str, Any]] = []
            for j, part in enumerate(content):
                param = f"messages[{i}].content[{j}]"
                if (part.type == "image_url" and part.image_url is not None
                        and image_placeholder is not None and image_urls is not None):
                    image_urls.append((part.image_url.url, f"{param}.image_url"))
                    parts.append({"type": "image"})
                    continue
                if part.type != "text" or part.text is None:
                    only = "text and image_url" if image_placeholder is not None else "text"
                    raise OpenAIError(
                        f"content part of type {part.type!r} is not supported by this model "
                        f"(only {only} parts are)", param=param,
                    )
                parts.append({"type": "text", "text": part.text})
            if content_format == "openai":
                msg["content"] = parts
            else:
                msg["content"] = "\n".join(p["text"] if p["type"] == "text" else
                                           str(image_placeholder) for p in parts)
        elif content is None:
            msg["content"] = ""
        if m.role == "assistant" and msg.get("tool_calls") is not None:
            msg["tool_calls"] = history_tool_calls(msg["tool_calls"], f"messages[{i}].tool_calls")
        out.append(msg)
    return out


def history_tool_calls(calls: object, param: str) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls` as templates expect them: each `function.arguments`
    (a JSON string, as OpenAI sends it) parsed to an object, since templates iterate or re-encode
    the arguments. A 400 naming the field for a call that is not `{"type": "function",
    "function": {"name": ..., "arguments": ...}}` or arguments that are not a JSON object."""
    if not isinstance(calls, list):
        raise OpenAIError(f"{param} must be an array of tool calls", param=param)
    out: list[dict[str, Any]] = []
    for j, call in enumerate(calls):
        where = f"{param}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(call, dict) or call.get("type", "function") != "function"
                or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)):
            raise OpenAIError(f'{where} must be {{"type": "function", "function": {{"name": '
                              '..., "arguments": "{...}"}}', param=where)
        args = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except (ValueError, RecursionError) as e:
                raise OpenAIError(f"{where}.function.arguments is not valid JSON: {e}",
                                  param=f"{where}.function.arguments") from None
        if not isinstance(args, dict):
            raise OpenAIError(f"{where}.function.arguments must be a JSON object (as a string)",
                              param=f"{where}.function.arguments")
        out.append({**call, "type": "function", "function": {**fn, "arguments": args}})
    return out

