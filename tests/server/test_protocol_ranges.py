"""Validation once, at the edge: the request bodies' ranges are SamplingParams' own."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from flatout.sampling_params import SamplingParams, SamplingParamsError
from flatout.server.protocol import ChatCompletionRequest, CompletionRequest

SP = SamplingParams
# field -> values just inside and just outside the range SamplingParams accepts
EDGES: dict[str, tuple[Any, Any]] = {
    "n": (SP.MAX_N, SP.MAX_N + 1),
    "temperature": (SP.MAX_TEMPERATURE, SP.MAX_TEMPERATURE + 0.5),
    "top_p": (1.0, 0.0),
    "top_k": (SP.MIN_TOP_K, SP.MIN_TOP_K - 1),
    "min_p": (1.0, 1.5),
    "repetition_penalty": (SP.MAX_REPETITION_PENALTY, SP.MAX_REPETITION_PENALTY + 0.5),
    "presence_penalty": (-SP.MAX_PENALTY, -SP.MAX_PENALTY - 0.5),
    "frequency_penalty": (SP.MAX_PENALTY, SP.MAX_PENALTY + 0.5),
    "seed": (SP.MAX_SEED, SP.MAX_SEED + 1),
    "logprobs": (SP.MAX_LOGPROBS, SP.MAX_LOGPROBS + 1),
    "stop_token_ids": ([SP.MAX_TOKEN_ID], [SP.MAX_TOKEN_ID + 1]),
}


@pytest.mark.parametrize("name", sorted(EDGES))
def test_bodies_and_sampling_params_agree_on_the_edges(name: str) -> None:
    inside, outside = EDGES[name]
    SamplingParams(**{name: inside})
    with pytest.raises(SamplingParamsError):
        SamplingParams(**{name: outside})
    CompletionRequest(prompt="x", **{name: inside})
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", **{name: outside})


def test_chat_top_logprobs_range_is_sampling_params() -> None:
    messages = [{"role": "user", "content": "hi"}]
    ChatCompletionRequest(messages=messages, logprobs=True, top_logprobs=SP.MAX_LOGPROBS)
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=messages, logprobs=True,
                              top_logprobs=SP.MAX_LOGPROBS + 1)
