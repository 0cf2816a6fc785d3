"""Turns the engine core's token outputs into RequestOutputs: detokenizes incrementally, applies
stop strings, and tells the caller which sequences to abort in the core because a stop string
ended them. Runs beside the caller (the offline LLM, or the server's API process), never in the
loop that drives the GPU.

Outputs are deltas (see flatout/engine/outputs.py): after each step, one RequestOutput per request
that advanced, holding for each sample that advanced only what the step added: the new token ids,
the new visible text and the newly settled logprobs. A step's work is proportional to what it added,
not to the length of the output so far.

A finished sequence's text is the decode of its generated tokens: bytes of an incomplete
character still held back at the end are flushed as U+FFFD. Each logprob carries the text its
token added (`TokenLogprobs.text`), so the logprobs' texts join to the output's text; a logprob
is reported once its text is settled (no longer held back), so the deltas of a stream join to
the final output. The same holds for the offline `LLM`, a streamed and a non-streamed response:
they all come from here. A request given its reasoning tags' ids gets its reasoning apart from
its answer (engine/reasoning_split.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flatout.engine.detokenizer import IncrementalDetokenizer
from flatout.engine.messages import EngineCoreOutput, FinishReason, TokenLogprobs
from flatout.engine.outputs import CompletionOutput, RequestOutput
from flatout.engine.reasoning_split import ReasoningSplit, ReasoningTokens
from flatout.sampling_params import SamplingParams


@dataclass
class _SampleState:
    detok: IncrementalDetokenizer
    split: ReasoningSplit | None = None  # reasoning split from the answer by the tags' ids
    num_sent_reasoning: int = 0  # of the split's reasoning, already in a delta
    logprobs: list[TokenLogprobs] | None = None  # raw, one per token not yet in a delta
    new_token_ids: list[int] = field(default_factory=list)  # since the last delta
    changed: bool = False  # has news for the next delta
    num_sent_chars: int = 0  # visible text already in a delta
    num_settled: int = 0  # logprobs already in a delta
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

    def new_text(self, done: bool) -> tuple[str | None, str]:
        """(reasoning, text) visible and not yet in a delta; the reasoning is None unless the
        output is split by the tags' ids and has reasoning, and then the text is the answer."""
        end = self.detok.visible_length(done)
        if self.split is None:
            text = self.detok.text[self.num_sent_chars : end]
            self.num_sent_chars = max(end, self.num_sent_chars)
            return None, text
        reasoning, answer = self.split.views(self.detok.text, end, done)
        new_reasoning = reasoning[self.num_sent_reasoning :]
        new_answer = answer[self.num_sent_chars :]
        self.num_sent_reasoning = max(len(reasoning), self.num_sent_reasoning)
        self.num_sent_chars = max(len(answer), self.num_sent_chars)
        return (new_reasoning if self.split.saw_reasoning else None), new_answer

    def new_logprobs(self, done: bool) -> list[TokenLogprobs] | None:
        """The logprobs whose token's text has settled in the visible text since the last delta,
        each with that text; all the rest once the sequence is done."""
        if self.logprobs is None:
            return None
        if self.detok.tokenizer is None:
            new, self.logprobs = self.logprobs, []
            self.num_settled += len(new)
            return new
        text, visible = self.detok.text, self.detok.visible_length(done)
        total = self.num_settled + len(self.logprobs)
        end = total if done else total - self.detok.num_pending
        added_texts = self.detok.token_texts  # a stop token, never given to it, adds ''
        new = []
        while self.num_settled < end:
            i = self.num_settled
            lp = self.logprobs[len(new)]
            added = added_texts[i] if i < len(added_texts) else ""
            start = self.settled_chars
            piece = text[start : min(start + len(added), visible)]
            if len(piece) < len(added) and not done:
                break  # held back: it may begin a stop string
            # cut where a stop string ended it
            new.append(TokenLogprobs(lp.token_id, lp.logprob, lp.top, piece))
            self.settled_chars += len(piece)
            self.num_settled += 1
        del self.logprobs[: len(new)]  # what is in a delta is no longer kept here
        return new


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
        params: SamplingParams, reasoning: ReasoningTokens | None = None,
    ) -> None:
        """`reasoning`: split each sample's output into reasoning and answer where these tag
        tokens are generated (the deltas' `reasoning` and `text`)."""
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
                split=ReasoningSplit(reasoning) if reasoning is not None else None,
            )
            for _ in range(params.n)
        ]
        self.requests[request_id] = _RequestState(request_id, prompt, prompt_token_ids, samples)

    def process(
        self, outputs: list[EngineCoreOutput]
    ) -> tuple[list[RequestOutput], list[tuple[str, int]]]:
        """Returns the deltas of requests that progressed, and the (request id, index) of
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
            results.append(self._make_delta(req))
            if req.finished:
                del self.requests[req.request_id]
        return results, to_abort

    def _apply(self, s: _SampleState, out: EngineCoreOutput) -> None:
        s.changed = True
        for i, token in enumerate(out.new_token_ids):
            s.new_token_ids.append(token)
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
            if s.split is not None and s.split.is_tag(token, s.detok.num_pending > 0):
                s.split.tag(token, s.detok.add_marker(token))
                continue
            s.detok.add_token(token, check_stop=True)
            if s.split is not None:
                s.split.text_added(s.detok.text)
            if s.detok.stopped_by is not None:
                s.finish_reason, s.stop_reason = FinishReason.STOP, s.detok.stopped_by
                return
        if out.finish_reason is not None:
            s.finish(out.finish_reason, out.stop_reason)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Drop a request; its last delta ends the samples still running with 'abort'."""
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        for s in req.samples:
            if s.finish_reason is None:
                s.finish(FinishReason.ABORT, None)
                s.changed = True
        return self._make_delta(req)

    @staticmethod
    def _make_delta(req: _RequestState) -> RequestOutput:
        outs = []
        for i, s in enumerate(req.samples):
            if not s.changed:
                continue
            done = s.finish_reason is not None
            reasoning, text = s.new_text(done)
            outs.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    reasoning=reasoning,
                    token_ids=s.new_token_ids,
                    finish_reason=str(s.finish_reason) if done else None,
                    stop_reason=s.stop_reason,
                    logprobs=s.new_logprobs(done),
                    cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                )
            )
            s.new_token_ids, s.changed = [], False
        return RequestOutput(
            request_id=req.request_id,
            prompt=req.prompt,
            prompt_token_ids=req.prompt_token_ids,
            outputs=outs,
            finished=req.finished,
            num_cached_tokens=req.num_cached_tokens,
            metrics=dict(req.metrics),
        )
