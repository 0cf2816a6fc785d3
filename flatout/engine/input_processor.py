"""Prompts into token ids, checked against the model and the KV cache before anything is queued.

Runs beside the caller (the offline LLM, or the server's API process); imports no torch."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flatout.config import ModelConfig
from flatout.engine.messages import RequestError
from flatout.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

@dataclass
class ProcessedPrompt:
    """A prompt tokenized and checked, ready to queue."""

    text: str | None  # as given, when it was text
    token_ids: list[int]
    max_tokens: int  # resolved: the request's, or what max_model_len (and the KV cache) leave


class InputProcessor:
    """Tokenizes and validates prompts against the model and the KV cache (no GPU work)."""

    def __init__(self, model_config: ModelConfig, tokenizer: Any, cache_tokens: int) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.cache_tokens = cache_tokens
        # a KV cache smaller than max_model_len: requests that leave max_tokens unset get what the
        # cache leaves rather than what max_model_len leaves (so they are served, not refused)
        self.default_limit = min(model_config.max_model_len, cache_tokens)
        if cache_tokens < model_config.max_model_len:
            logger.warning(
                "the KV cache holds %d tokens, fewer than max_model_len (%d): one sequence can "
                "use at most %d tokens, and requests without max_tokens get what that leaves",
                cache_tokens, model_config.max_model_len, cache_tokens)
        eos = list(model_config.eos_token_ids)
        if tokenizer is not None:
            from flatout.tokenizers import stop_token_ids

            eos += stop_token_ids(tokenizer, model_config.tokenizer)
        # GLM chat models end a turn with any of three tokens; all of them stop generation
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos))

    def encode(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: pass prompts as token ids")
            return prompt, self.tokenizer.encode(prompt)
        if not isinstance(prompt, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            raise RequestError("prompt must be a string or a list of token ids")
        return None, list(prompt)

    def process(self, prompt: str | list[int], params: SamplingParams) -> ProcessedPrompt:
        """Tokenize and validate one prompt (raises RequestError)."""
        text, ids = self.encode(prompt)
        return ProcessedPrompt(text, ids, self.validate(ids, params))

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request can ever be served; return its resolved max_tokens."""
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        params.check_token_ids(vocab)
        limit = self.model_config.max_model_len
        if n >= limit:
            raise RequestError(
                f"prompt has {n} tokens; this model's max_model_len is {limit} "
                f"(the prompt plus at least one generated token must fit)"
            )
        if params.max_tokens is None and n >= self.default_limit:
            raise RequestError(
                f"prompt has {n} tokens; the KV cache holds {self.cache_tokens} tokens "
                f"(the prompt plus at least one generated token must fit)"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else self.default_limit - n
        if n + max_tokens > limit:
            raise RequestError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds "
                f"max_model_len ({limit}); lower max_tokens to at most {limit - n}"
            )
        if n + max_tokens > self.cache_tokens:
            raise RequestError(
                f"prompt + max_tokens ({n + max_tokens} tokens) exceeds the whole KV cache "
                f"({self.cache_tokens} tokens)"
            )
        return max_tokens


def load_tokenizer_for(model_config: ModelConfig) -> Any:
    if model_config.tokenizer is None:
        return None
    from flatout.tokenizers import load_tokenizer

    return load_tokenizer(model_config.tokenizer)
