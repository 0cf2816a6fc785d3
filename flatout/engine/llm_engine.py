"""The engine loop: requests in, one `step()` = schedule -> run -> postprocess, outputs out."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from flatout.config import CacheConfig, EngineArgs, ModelConfig, SchedulerConfig
from flatout.engine.block_manager import BlockManager
from flatout.engine.detokenizer import IncrementalDetokenizer
from flatout.engine.request import FinishReason, Sequence, TokenLogprobs
from flatout.engine.scheduler import Scheduler
from flatout.models.registry import resolve_model_config
from flatout.outputs import CompletionOutput, RequestOutput
from flatout.sampling_params import SamplingParams
from flatout.worker.model_runner import ModelRunner, SampledToken

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that can never be served (too long, bad prompt); raised at submission."""


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    arrival_time: float
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)


@dataclass
class EngineStats:
    num_steps: int = 0
    num_prefill_tokens: int = 0  # prompt (and recomputed) tokens actually computed
    num_decode_tokens: int = 0
    num_generated_tokens: int = 0


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is available")
    return torch.device(device)


class LLMEngine:
    def __init__(self, args: EngineArgs) -> None:
        if args.tensor_parallel_size != 1:
            raise NotImplementedError("tensor_parallel_size > 1 is not supported yet")
        self.args = args
        model = args.model
        if model is None:
            from flatout.demo import demo_model_path

            model = demo_model_path()
        self.device = resolve_device(args.device)
        torch.manual_seed(args.seed)
        self.model_config: ModelConfig = resolve_model_config(
            model,
            dtype=args.dtype,
            device_type=self.device.type,
            max_model_len=args.max_model_len,
            load_format=args.load_format,
            tokenizer=args.tokenizer,
        )
        self.tokenizer: Any = None
        if self.model_config.tokenizer is not None:
            from flatout.tokenizer import load_tokenizer

            self.tokenizer = load_tokenizer(self.model_config.tokenizer)
        self.eos_token_ids: tuple[int, ...] = self.model_config.eos_token_ids
        self.runner = ModelRunner(self.model_config, args, self.device)
        self.cache_config = CacheConfig(
            block_size=args.block_size,
            num_blocks=self.runner.num_blocks,
            enable_prefix_caching=args.enable_prefix_caching,
        )
        self.scheduler_config = SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_model_len=self.model_config.max_model_len,
        )
        self.block_manager = BlockManager(
            self.cache_config.num_blocks, args.block_size, args.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.requests: dict[str, _Request] = {}
        self.stats = EngineStats()
        self._seq_ids = itertools.count()

    # -- requests ---------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.model_config.max_model_len

    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        """SamplingParams with the checkpoint's generation_config.json defaults."""
        return SamplingParams.from_defaults(self.model_config.generation_defaults, **overrides)

    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
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
        """Check a request can be served; return its resolved max_tokens."""
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("prompt is empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in prompt_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        limit = self.max_model_len
        if n >= limit:
            raise RequestError(
                f"prompt has {n} tokens; this model's max_model_len is {limit} "
                f"(prompt plus at least one generated token must fit)"
            )
        max_tokens = params.max_tokens if params.max_tokens is not None else limit - n
        if n + max_tokens > limit:
            raise RequestError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) = {n + max_tokens} exceeds "
                f"max_model_len ({limit}); lower max_tokens to at most {limit - n}"
            )
        capacity = self.cache_config.num_blocks * self.cache_config.block_size
        if n + max_tokens > capacity:
            raise RequestError(
                f"prompt + max_tokens ({n + max_tokens} tokens) exceeds the whole KV cache "
                f"({capacity} tokens)"
            )
        return max_tokens

    def add_request(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> None:
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        text, ids = self.encode_prompt(prompt)
        max_tokens = self.validate(ids, params)
        now = time.monotonic()
        seqs, detoks = [], []
        for i in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=i,
                prompt_token_ids=ids,
                params=params,
                max_tokens=max_tokens,
                arrival_time=now,
            )
            seqs.append(seq)
            detoks.append(
                IncrementalDetokenizer(
                    self.tokenizer,
                    ids,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                    stop=params.stop,  # type: ignore[arg-type]
                    include_stop_str_in_output=params.include_stop_str_in_output,
                )
            )
        self.requests[request_id] = _Request(request_id, text, ids, seqs, detoks, now)
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for seq in req.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
            self.runner.release(seq)
        return self._make_output(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduling step; return outputs of the requests that progressed."""
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        sampled = self.runner.execute(sched, self.eos_token_ids)
        self.scheduler.update_computed(sched)
        self.stats.num_steps += 1
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            if seq.num_output_tokens == 0 or n > 1:
                self.stats.num_prefill_tokens += n
            else:
                self.stats.num_decode_tokens += n
        touched: dict[str, _Request] = {}
        now = time.monotonic()
        for tok in sampled:
            req = self.requests[tok.seq.request_id]
            self._append_token(req, tok, now)
            touched[req.request_id] = req
        outputs = []
        for req in touched.values():
            outputs.append(self._make_output(req))
            if req.finished:
                del self.requests[req.request_id]
        return outputs

    def _append_token(self, req: _Request, tok: SampledToken, now: float) -> None:
        seq, token = tok.seq, tok.token_id
        p = seq.params
        seq.token_ids.append(token)
        self.stats.num_generated_tokens += 1
        if seq.first_token_time is None:
            seq.first_token_time = now
        if seq.logprobs is not None and tok.logprob is not None:
            seq.logprobs.append(TokenLogprobs(token, tok.logprob, tok.top or {}))
            seq.cumulative_logprob += tok.logprob
        reason: FinishReason | None = None
        past_min = seq.num_output_tokens >= p.min_tokens
        if past_min and token in p.stop_token_ids:  # type: ignore[operator]
            reason, seq.stop_reason = FinishReason.STOP, token
        elif past_min and not p.ignore_eos and token in self.eos_token_ids:
            reason = FinishReason.STOP
        else:
            detok = req.detokenizers[seq.index]
            detok.add_token(token, check_stop=past_min)
            if detok.stopped_by is not None:
                reason, seq.stop_reason = FinishReason.STOP, detok.stopped_by
        if reason is None and (
            seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            reason = FinishReason.LENGTH
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self.runner.release(seq)

    def _make_output(self, req: _Request) -> RequestOutput:
        outs = []
        for seq, detok in zip(req.seqs, req.detokenizers, strict=True):
            done = seq.is_finished
            outs.append(
                CompletionOutput(
                    index=seq.index,
                    text=detok.visible_text(done),
                    token_ids=list(seq.output_token_ids),
                    finish_reason=str(seq.finish_reason) if done else None,
                    stop_reason=seq.stop_reason,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=req.finished,
            num_cached_tokens=req.seqs[0].num_cached_tokens,
        )
