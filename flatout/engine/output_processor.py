"""Turns the engine core's token outputs into RequestOutputs: detokenizes incrementally, applies
stop strings, and tells the caller which sequences to abort in the core because a stop string
ended them. Runs beside the caller (the offline LLM, or the server's API process), never in the
loop that drives the GPU.

A finished sequence's text is the decode of its generated tokens: bytes of an incomplete
character still held back at the end are flushed as U+FFFD. Each logprob carries the text its
token added (`TokenLogprobs.text`), so the logprobs' texts join to the output's text; a logprob
is reported once its text is settled (no longer held back), so every output of a stream agrees
with the final one."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from flatout.engine.detokenizer import IncrementalDetokenizer
from flatout.engine.messages import EngineCoreOutput, FinishReason, TokenLogprobs
from flatout.outputs import CompletionOutput, RequestOutput
from flatout.sampling_params import SamplingParams


@dataclass
class _SampleState:
    detok: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None  # raw, one per token
    settled: list[TokenLogprobs] = field(default_factory=list)  # reported, with their text
    settled_chars: int = 0  # length of the text the settled logprobs cover
    cumulative_logprob: float = 0.0
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None

    def finish(self, reason: FinishReason, stop_reason: int | str | None) -> None:
        """End the sequence: flush held-back bytes into the text (as U+FFFD where they are an
        incomplete character); a stop string in the flushed text ends it there instead."""
        self.detok.flush()
        if self.detok.stopped_by is not None:
            reason, stop_reason = FinishReason.STOP, self.detok.stopped_by
        self.finish_reason, self.stop_reason = reason, stop_reason

    def reported_logprobs(self, text: str, done: bool) -> list[TokenLogprobs] | None:
        """The logprobs whose token's text is settled in `text` (the visible text), each with
        that text; all of them once the sequence is done."""
        if self.logprobs is None:
            return None
        if self.detok.tokenizer is None:
            return list(self.logprobs)
        end = len(self.logprobs) if done else len(self.logprobs) - self.detok.num_pending
        added_texts = self.detok.token_texts  # a stop token, never given to it, adds ''
        while len(self.settled) < end:
            i = len(self.settled)
            lp, added = self.logprobs[i], added_texts[i] if i < len(added_texts) else ""
            piece = text[self.settled_chars : self.settled_chars + len(added)]
            if len(piece) < len(added) and not done:
                break  # held back: it may begin a stop string
            self.settled.append(replace(lp, text=piece))  # cut where a stop string ended it
            self.settled_chars += len(piece)
        return list(self.settled)


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[_SampleState]
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}

    def add_request(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> None:
        samples = [
            _SampleState(
                detok=IncrementalDetokenizer(
                    self.tokenizer,
                    prompt_token_ids,
                    skip_special_tokens=params.skip_special_tokens,
                    spaces_between_special_tokens=params.spaces_between_special_tokens,
                    stop=params.stop,  # type: ignore[arg-type]
                    include_stop_str_in_output=params.include_stop_str_in_output,
                ),
                logprobs=[] if params.logprobs is not None else None,
            )
            for _ in range(params.n)
        ]
        self.requests[request_id] = _RequestState(request_id, prompt, prompt_token_ids, samples)

    def process(
        self, outputs: list[EngineCoreOutput]
    ) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """Returns the outputs of requests that progressed, and the (request id, index) of
        sequences a stop string ended, which the caller must abort in the core."""
        touched: dict[str, _RequestState] = {}
        to_abort: list[tuple[str, int]] = []
        for out in outputs:
            req = self.requests.get(out.request_id)
            if req is None:
                continue  # aborted meanwhile
            s = req.samples[out.index]
            if s.finish_reason is not None:
                continue  # a stop string ended it; the core produced one more before the abort
            req.num_cached_tokens = out.num_cached_tokens
            if out.queue_time is not None and "queue_time" not in req.metrics:
                req.metrics["queue_time"] = out.queue_time
            touched[req.request_id] = req
            self._apply(s, out)
            if s.finish_reason is not None and out.finish_reason is None:
                to_abort.append((out.request_id, out.index))
        results = []
        for req in touched.values():
            results.append(self._make_output(req))
            if req.finished:
                del self.requests[req.request_id]
        return results, to_abort

    def _apply(self, s: _SampleState, out: EngineCoreOutput) -> None:
        for i, token in enumerate(out.new_token_ids):
            s.token_ids.append(token)
            if out.new_logprobs is not None and s.logprobs is not None:
                lp = out.new_logprobs[i]
                s.logprobs.append(lp)
                s.cumulative_logprob += lp.logprob
            last = i == len(out.new_token_ids) - 1
            # EOS (stop_reason None) or a stop token id ended it: that token adds no text
            if last and out.finish_reason is FinishReason.STOP and (
                out.stop_reason is None or out.stop_reason == token
            ):
                break  # the stop token itself is not part of the text
            s.detok.add_token(token, check_stop=True)
            if s.detok.stopped_by is not None:
                s.finish_reason, s.stop_reason = FinishReason.STOP, s.detok.stopped_by
                return
        if out.finish_reason is not None:
            s.finish(out.finish_reason, out.stop_reason)

    def abort(self, request_id: str) -> RequestOutput | None:
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for s in req.samples:
            if s.finish_reason is None:
                s.finish(FinishReason.ABORT, None)
        return self._make_output(req)

    @staticmethod
    def _make_output(req: _RequestState) -> RequestOutput:
        outs = []
        for i, s in enumerate(req.samples):
            done = s.finish_reason is not None
            text = s.detok.visible_text(done)
            outs.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=list(s.token_ids),
                    finish_reason=str(s.finish_reason) if done else None,
                    stop_reason=s.stop_reason,
                    logprobs=s.reported_logprobs(text, done),
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                )
            )
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=req.finished,
            num_cached_tokens=req.num_cached_tokens,
            metrics=dict(req.metrics),
        )
