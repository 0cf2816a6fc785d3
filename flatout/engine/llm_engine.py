"""The in-process engine: input processing + EngineCore + OutputProcessor in one process.

The offline `LLM` drives it; the server drives the same EngineCore in a process of its own and
the same input/output processing in the API process (async_client.py)."""

from __future__ import annotations

import logging
from typing import Any

from flatout.config import EngineArgs
from flatout.engine.engine_core import EngineCore
from flatout.engine.input_processor import InputProcessor, ProcessedPrompt, load_tokenizer_for
from flatout.engine.messages import EngineCoreRequest, RequestError, RequestFieldError
from flatout.engine.output_processor import OutputProcessor
from flatout.engine.outputs import RequestOutput
from flatout.sampling_params import SamplingParams

__all__ = ["LLMEngine", "RequestError"]

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        self.core = EngineCore(args)
        self.model_config = self.core.model_config
        self.tokenizer = load_tokenizer_for(self.model_config)
        cc = self.core.cache_config
        cache_tokens = cc.planned_num_blocks * cc.block_size
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

    def add_request(
        self, request_id: str, prompt: str | list[int] | ProcessedPrompt, params: SamplingParams
    ) -> None:
        """Queue a prompt; one already through `self.inputs.process` is not processed again."""
        if not isinstance(prompt, ProcessedPrompt):
            prompt = self.inputs.process(prompt, params)
        if request_id in self.outputs.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        ids = prompt.token_ids
        self.core.add_request(
            EngineCoreRequest(request_id, ids, params, prompt.max_tokens,
                              self.inputs.eos_token_ids, mm_items=prompt.mm_items)
        )
        self.outputs.add_request(request_id, prompt.text, ids, params)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Abort a request; returns its last delta (None if it was not running)."""
        self.core.abort(request_id)
        return self.outputs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.outputs.requests)

    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return the deltas of the requests that progressed (see
        flatout/engine/outputs.py)."""
        outputs = self.core.step()
        for request_id, e in self.core.take_rejected():
            self.outputs.abort(request_id)
            raise RequestFieldError(e.field, str(e))
        results, to_abort = self.outputs.process(outputs)
        for request_id, index in to_abort:
            self.core.abort(request_id, index)
        return results

    def shutdown(self) -> None:
        """Stop the engine core (its tensor-parallel workers and process group) and release the
        model and KV cache; idempotent."""
        self.core.shutdown()
