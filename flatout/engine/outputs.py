"""What generation returns: one RequestOutput per prompt, with one CompletionOutput per sample.

The output processor emits them as deltas, one per step that advanced a request: each
CompletionOutput then holds what that step added to one sample (its new token ids, new text and
newly settled logprobs; `finish_reason` once it ends), and only the samples that advanced are
listed. `OutputAccumulator` joins a request's deltas into its whole output, which is what
`LLM.generate` returns and what non-streamed responses are built from; `join_deltas` joins two
consecutive deltas into one (a consumer that fell behind takes what waited as one delta).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from flatout.engine.messages import TokenLogprobs

T = TypeVar("T")


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop token id or stop string, if one ended it
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float | None = None  # over all the sample's tokens so far
    # the reasoning (then `text` is the answer) where the output is split by the reasoning
    # tags' token ids (engine/reasoning_split.py); None without a split or reasoning
    reasoning: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)

    # the first sample's fields, for the common n == 1 case
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def stop_reason(self) -> int | str | None:
        return self.outputs[0].stop_reason


# (token id, logprob, top ids, top logprobs, text): three objects a token
_CompactLogprobs = tuple[int, float, tuple[int, ...], tuple[float, ...], str | None]


def _compact(lp: TokenLogprobs) -> _CompactLogprobs:
    return lp.token_id, lp.logprob, tuple(lp.top), tuple(lp.top.values()), lp.text


def _expand(c: _CompactLogprobs) -> TokenLogprobs:
    return TokenLogprobs(c[0], c[1], dict(zip(c[2], c[3], strict=True)), c[4])


def join_deltas(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One delta holding what `first` and then `then` (the request's next delta) added: texts,
    token ids, logprobs and reasoning joined per sample, the later finish reasons, cumulative
    logprobs and request-level fields. Reuses `first`'s objects (a delta has one owner)."""
    by_index = {o.index: o for o in first.outputs}
    for o in then.outputs:
        a = by_index.get(o.index)
        if a is None:
            first.outputs.append(o)
            by_index[o.index] = o
            continue
        a.text += o.text
        a.token_ids.extend(o.token_ids)  # `first` owns its lists: extended in place
        if o.logprobs is not None:
            if a.logprobs is None:
                a.logprobs = []
            a.logprobs.extend(o.logprobs)
        if o.reasoning is not None:
            a.reasoning = (a.reasoning or "") + o.reasoning
        a.finish_reason, a.stop_reason = o.finish_reason, o.stop_reason
        a.cumulative_logprob = o.cumulative_logprob
    first.finished = then.finished
    first.num_cached_tokens = then.num_cached_tokens
    first.metrics = {**first.metrics, **then.metrics}
    return first


class _Packed(Generic[T]):
    """An append-only sequence kept as tuples of PACK items: the collector stops tracking a
    tuple of untracked values, so a full collection visits a few objects per sample instead of
    every token's (a list is traversed item by item: 128 samples x 1,000 tokens x 3 lists took
    each pass ~90 ms on a 2-core CPU)."""

    PACK = 256

    def __init__(self) -> None:
        self._packs: list[tuple[T, ...]] = []
        self._tail: list[T] = []

    def extend(self, items: Iterable[T]) -> None:
        self._tail.extend(items)
        if len(self._tail) >= self.PACK:
            self._packs.append(tuple(self._tail))
            self._tail = []

    def append(self, item: T) -> None:
        self.extend((item,))

    def __iter__(self) -> Iterator[T]:
        for pack in self._packs:
            yield from pack
        yield from self._tail


@dataclass
class _Sample:
    texts: _Packed[str] = field(default_factory=_Packed)
    token_ids: _Packed[int] = field(default_factory=_Packed)
    # TokenLogprobs as tuples of plain values (`_compact`): the collector stops tracking such
    # a tuple once it has seen it (not a tuple subclass, nor one holding a dict), and a request
    # holds one per token until it ends (n=128 x 1,000 tokens: 128,000, which every full
    # collection scanned, holding the API process's GIL 50-80 ms a pass)
    logprobs: _Packed[_CompactLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    reasoning: list[str] | None = None


class OutputAccumulator:
    """Joins the deltas of one request with `n` samples into its whole RequestOutput. Each delta
    costs what it holds; the text is joined once, in `result`."""

    def __init__(self, n: int, keep_outputs: bool = True) -> None:
        """`keep_outputs=False`: count tokens and keep finish reasons only (a stream, whose
        deltas have been sent, needs no more for its usage); `result` then has no text."""
        self._samples = [_Sample() for _ in range(n)]
        self._last: RequestOutput | None = None  # the latest delta: request-level fields
        self.keep_outputs = keep_outputs
        self._num_tokens = [0] * n

    def add(self, delta: RequestOutput) -> None:
        for o in delta.outputs:
            s = self._samples[o.index]
            self._num_tokens[o.index] += len(o.token_ids)
            s.finish_reason, s.stop_reason = o.finish_reason, o.stop_reason
            s.cumulative_logprob = o.cumulative_logprob
            if not self.keep_outputs:
                continue
            s.texts.append(o.text)
            if o.reasoning is not None:
                if s.reasoning is None:
                    s.reasoning = []
                s.reasoning.append(o.reasoning)
            s.token_ids.extend(o.token_ids)
            if o.logprobs is not None:
                if s.logprobs is None:
                    s.logprobs = _Packed()
                s.logprobs.extend(map(_compact, o.logprobs))
        self._last = delta

    @property
    def finished(self) -> bool:
        return self._last is not None and self._last.finished

    @property
    def num_prompt_tokens(self) -> int:
        return len(self._last.prompt_token_ids) if self._last is not None else 0

    @property
    def num_cached_tokens(self) -> int:
        return self._last.num_cached_tokens if self._last is not None else 0

    def num_tokens(self) -> list[int]:
        """Generated tokens so far, per sample."""
        return list(self._num_tokens)

    def finish_reasons(self) -> list[str | None]:
        """Per sample: how it ended, None while it runs (or if it never started)."""
        return [s.finish_reason for s in self._samples]

    def release(self) -> None:
        """Let go of the kept outputs (once `result` has been taken), a sample at a time:
        freed at once, a large request's per-token records (n=128 x 1,000 tokens: ~400,000
        objects) held the GIL ~40 ms in one deallocation. `result` then has no text."""
        self.keep_outputs = False
        for s in self._samples:
            s.texts, s.token_ids, s.logprobs, s.reasoning = _Packed(), _Packed(), None, None

    def result(self) -> RequestOutput:
        """The whole output so far (call once a delta has come)."""
        last = self._last
        assert last is not None, "no output yet"
        outs = [
            CompletionOutput(
                index=i, text="".join(s.texts), token_ids=list(s.token_ids),
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                logprobs=list(map(_expand, s.logprobs)) if s.logprobs is not None else None,
                cumulative_logprob=s.cumulative_logprob,
                reasoning="".join(s.reasoning) if s.reasoning is not None else None,
            )
            for i, s in enumerate(self._samples)
        ]
        return RequestOutput(
            request_id=last.request_id, prompt=last.prompt,
            prompt_token_ids=last.prompt_token_ids, outputs=outs, finished=last.finished,
            num_cached_tokens=last.num_cached_tokens, metrics=dict(last.metrics),
        )
