"""The in-process engine: input processing + EngineCore + OutputProcessor in one process.

The offline `LLM` drives it; the server drives the same EngineCore in a process of its own and
the same input/output processing in the API process (core_client.py)."""

from __future__ import annotations

import logging
from typing import Any

from flatout.config import EngineArgs, ModelConfig
from flatout.engine.engine_core import EngineCore, EngineCoreRequest
from flatout.engine.output_processor import OutputProcessor
from flatout.outputs import RequestOutput
from flatout.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that can never be served (too long, bad prompt); raised at submission."""


class InputProcessor:
    """Tokenizes and validates prompts against the model and the KV cache (no GPU work)."""

    def __init__(self, model_config: ModelConfig, tokenizer: Any, cache_tokens: int) -> None:
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.cache_tokens = cache_tokens
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

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request can ever be served; return its resolved max_tokens."""
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        limit = self.model_config.max_model_len
        if n >= limit:
            raise RequestError(
                f"prompt has {n} tokens; this model's max_model_len is {limit} "
                f"(the prompt plus at least one generated token must fit)"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
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


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.core = EngineCore(args)
        self.model_config = self.core.model_config
        self.tokenizer = load_tokenizer_for(self.model_config)
        cc = self.core.cache_config
        cache_tokens = cc.num_blocks * cc.block_size
        self.inputs = InputProcessor(self.model_config, self.tokenizer, cache_tokens)
        self.outputs = OutputProcessor(self.tokenizer)

    @property
    def stats(self):  # noqa: ANN201
        return self.core.stats

    @property
    def scheduler(self):  # noqa: ANN201
        return self.core.scheduler

    @property
    def block_manager(self):  # noqa: ANN201
        return self.core.block_manager

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults."""
        return SamplingParams.from_defaults(self.model_config.generation_defaults, **overrides)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        text, ids = self.inputs.encode(prompt)
        max_tokens = self.inputs.validate(ids, params)
        if request_id in self.outputs.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        self.core.add_request(
            EngineCoreRequest(request_id, ids, params, max_tokens, self.inputs.eos_token_ids)
        )
        self.outputs.add_request(request_id, text, ids, params)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        self.core.abort(request_id)
        return self.outputs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.requests)

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return outputs of the requests that progressed."""
        results, to_abort = self.outputs.process(self.core.step())
        for request_id, index in to_abort:
            self.core.abort(request_id, index)
        return results
