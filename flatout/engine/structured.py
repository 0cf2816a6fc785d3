"""Structured output in the engine core: grammars compiled off the step's path, one matcher per
sequence, and the token bitmask of a step.

A request with `structured_outputs` is not scheduled until its grammar is compiled: the engine
core submits it to `GrammarCompiler`, whose threads compile it (xgrammar, against the model's
tokenizer) and cache it by (kind, spec), and admits the request at the first step after the
compilation finished. Each of its sequences then owns a `SequenceGrammar` (a matcher advanced
with every token the sequence accepts). Before a step samples, `fill_bitmask` writes the tokens
each grammar row may take next into a [rows, ceil(V / 32)] int32 bitmask (bit set: allowed) that
the sampler applies to the logits on the device.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import xgrammar as xgr

from flatout.sampling_params import StructuredOutputsParams

log = logging.getLogger(__name__)

# compiled grammars kept, least recently used dropped first (with its token-mask cache, the
# nested schema of benchmarks/bench_structured.py takes 0.6 MB for a 151,552-token vocabulary)
CACHE_SIZE = 128


class GrammarError(ValueError):
    """A request's grammar cannot be compiled; `field` names the request field it came from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _threads() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class GrammarCompiler:
    """Compiles grammars in a thread pool, cached by (kind, spec). The tokenizer's vocabulary is
    read (in a pool thread too) when the first grammar is compiled; `tokenizer_info` gives it
    instead (benchmarks on checkpoints without a tokenizer)."""

    def __init__(self, tokenizer_path: str | None, vocab_size: int,
                 cache_size: int = CACHE_SIZE,
                 tokenizer_info: xgr.TokenizerInfo | None = None) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.cache_size = cache_size
        self.tokenizer_info = tokenizer_info
        self._pool = ThreadPoolExecutor(_threads(), thread_name_prefix="flatout-grammar")
        self._lock = threading.Lock()
        self._compiler: xgr.GrammarCompiler | None = None
        self._cache: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()

    def submit(self, so: StructuredOutputsParams) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar of `so`, now or later (a failed one raises GrammarError)."""
        key = (so.kind, so.spec)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                return future
            future = self._pool.submit(self._compile, so)
            self._cache[key] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return future

    def compile_now(self, so: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Compile in the caller's thread (benchmarks, tests); not cached."""
        return self._compile(so)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _xgr_compiler(self) -> xgr.GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                info = self.tokenizer_info
                if info is None:
                    if self.tokenizer_path is None:
                        raise GrammarError("structured_outputs",
                                           "this model has no tokenizer, which a grammar needs")
                    from flatout.tokenizers import load_tokenizer

                    info = xgr.TokenizerInfo.from_huggingface(
                        load_tokenizer(self.tokenizer_path), vocab_size=self.vocab_size)
                # our cache bounds what is kept; xgrammar's own would grow without limit
                self._compiler = xgr.GrammarCompiler(info, max_threads=_threads(),
                                                     cache_enabled=False)
            return self._compiler

    def _compile(self, so: StructuredOutputsParams) -> xgr.CompiledGrammar:
        compiler = self._xgr_compiler()
        try:
            match so.kind:
                case "json":
                    return compiler.compile_json_schema(so.spec, any_whitespace=False)
                case "json_object":
                    return compiler.compile_json_schema('{"type": "object"}', any_whitespace=False)
                case "regex":
                    return compiler.compile_regex(so.spec)
                case "choice":
                    return compiler.compile_grammar(choice_grammar(so.choice or []))
                case "structural_tag":
                    return compiler.compile_structural_tag(so.spec)
                case _:
                    return compiler.compile_grammar(so.spec)
        except RuntimeError as e:  # xgrammar's parse and conversion errors
            raise GrammarError(so.field, f"cannot compile the {so.kind.replace('_', ' ')}: "
                               f"{_reason(e)}") from None


def choice_grammar(choices: list[str]) -> str:
    """EBNF for exactly one of `choices` (JSON's string escapes are the EBNF literal's)."""
    import json

    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _reason(e: RuntimeError) -> str:
    """xgrammar's message without its source location prefix."""
    text = str(e).strip()
    if text.startswith("[") and ": " in text:  # "[hh:mm:ss] /path/file.cc:123: message"
        head, _, rest = text.partition(".cc:")
        if rest:
            text = rest.partition(": ")[2] or text
    return text.splitlines()[0][:300] if text else "invalid"


@dataclass
class SequenceGrammar:
    """One sequence's matcher. `waiting_for`: the token (a reasoning model's `</think>`) after
    which the grammar starts; None once it has (or from the start)."""

    matcher: xgr.GrammarMatcher
    waiting_for: int | None = None

    @classmethod
    def start(cls, compiled: xgr.CompiledGrammar, so: StructuredOutputsParams,
              stop_token_ids: list[int]) -> SequenceGrammar:
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=stop_token_ids or None)
        return cls(matcher, so.after_token_id)

    @property
    def active(self) -> bool:
        """The next token is constrained."""
        return self.waiting_for is None and not self.matcher.is_terminated()

    def accept(self, token_id: int) -> bool:
        """Advance with an accepted token; True when the grammar has ended (its stop token was
        taken, or a token it does not allow, which the bitmask prevents)."""
        if self.waiting_for is not None:
            if token_id == self.waiting_for:
                self.waiting_for = None
            return False
        if self.matcher.is_terminated():
            return True
        if not self.matcher.accept_token(token_id):
            log.warning("a sampled token outside the grammar ended a structured output")
            return True
        return self.matcher.is_terminated()


class BitmaskFiller:
    """Fills one step's bitmask for its grammar rows, in xgrammar's threads.

    With `pin` (a CUDA device) the bitmask lives in one pinned host buffer reused every step, so
    the runner's copy to the device is asynchronous. Reuse is safe: a step's bitmask is filled
    only after the previous step's tokens were read back, which waits for that step's sampling
    and so for its copy of the buffer."""

    def __init__(self, vocab_size: int, pin: bool = False) -> None:
        self.vocab_size = vocab_size
        self.num_words = -(-vocab_size // 32)
        self.pin = pin
        self._batch = xgr.BatchGrammarMatcher(_threads())
        self._host: torch.Tensor | None = None  # [capacity, words] int32

    def fill(self, grammars: list[SequenceGrammar | None]) -> torch.Tensor | None:
        """[rows, ceil(V / 32)] int32 on the host (all bits set on unconstrained rows), None
        when no row is constrained this step."""
        rows = [i for i, g in enumerate(grammars) if g is not None and g.active]
        if not rows:
            return None
        bitmask = self._buffer(len(grammars))
        bitmask.numpy().fill(-1)  # numpy: no intra-op thread pool to wake for 1 MB
        matchers: list[Any] = [grammars[i].matcher for i in rows]  # type: ignore[union-attr]
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
        return bitmask

    def _buffer(self, num_rows: int) -> torch.Tensor:
        if self._host is None or self._host.shape[0] < num_rows:
            capacity = max(num_rows, 2 * (0 if self._host is None else self._host.shape[0]))
            self._host = torch.empty(capacity, self.num_words, dtype=torch.int32,
                                     pin_memory=self.pin)
        return self._host[:num_rows]
