"""Incremental detokenization with stop strings.

Text is produced by decoding a short sliding window of tokens twice (with and without the newest
ones) and emitting the difference, and only once it no longer ends in U+FFFD, so a character
whose bytes span several tokens is emitted whole, never cut. The window starts with the last few
prompt tokens so that tokenizers which render a leading space by context do so correctly. When
the sequence ends, `flush` emits bytes still held back (an incomplete character) as the tokenizer
renders them, U+FFFD, so the final text is what `tokenizer.decode(generated_ids)` returns.

`token_texts` attributes the text to the tokens: when several held-back tokens are emitted at
once, each gets the part of the text that decoding up to it already settles (the bytes of an
invalid sequence go to their own token), and the rest of a character goes to the token that
completes it; the others get ''. The entries join to the text (before stop-string cutting).

Stop strings are searched for in the newly produced text (plus enough look-back to catch a stop
string that straddles two steps). While a sequence runs, the last `len(longest stop) - 1`
characters are held back from `visible_text`, so a streaming client never receives the beginning
of a stop string that is then cut.

A sequence decodes its window twice per token, so the decode call's own cost counts: for a fast
(`tokenizers`-backed) tokenizer whose decoding transformers does not post-process, the window
goes to the Rust tokenizer directly (`backend_decoder`), which returns the same string without
transformers' per-call argument conversion (most of the cost on short windows).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

_PROMPT_CONTEXT = 5


def backend_decoder(tokenizer: Any, skip_special_tokens: bool) -> Callable[[list[int]], str] | None:
    """`ids -> tokenizer.decode(ids, skip_special_tokens=...)` straight through the Rust
    tokenizer, or None where that would not return the same string: a tokenizer that is not a
    plain transformers fast tokenizer (flatout's own sentencepiece and tiktoken ones override
    decoding), or one that cleans up spaces after decoding. A fast tokenizer ignores
    `spaces_between_special_tokens`, so it needs no check."""
    from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

    cls = type(tokenizer)
    if not (isinstance(tokenizer, PreTrainedTokenizerFast)
            and cls.decode is PreTrainedTokenizerBase.decode
            and cls._decode is PreTrainedTokenizerFast._decode
            and not tokenizer.clean_up_tokenization_spaces):
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return None
    return functools.partial(backend.decode, skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Any,  # transformers PreTrainedTokenizerBase, or None for token-id-only models
        prompt_token_ids: list[int],
        *,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: list[str] | None = None,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.stop = stop or []
        self.include_stop = include_stop_str_in_output
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.tokens = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.text = ""
        self.token_texts: list[str] = []  # per generated token: the text it added
        self.stopped_by: str | None = None
        self._backend_decode = (backend_decoder(tokenizer, skip_special_tokens)
                                if tokenizer is not None else None)

    def _decode(self, ids: list[int]) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(ids)
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
        )

    @property
    def num_pending(self) -> int:
        """Generated tokens whose text is held back (an incomplete character so far)."""
        return len(self.tokens) - self.read_offset

    def add_token(self, token_id: int, check_stop: bool = True) -> str:
        """Append one generated token; return the text it completed ('' while a character is
        incomplete). Sets `stopped_by` when a stop string appears (if `check_stop`)."""
        if self.tokenizer is None:
            return ""
        self.tokens.append(token_id)
        self.token_texts.append("")
        return self._emit(final=False, check_stop=check_stop)

    def add_marker(self, token_id: int) -> int:
        """Append a generated token that adds no text and that text never spans: a single-token
        reasoning tag, where the output is split by id. What was held back before it is
        flushed first (an incomplete character as U+FFFD: no byte after the tag completes it),
        and decoding starts afresh after it. Returns the length of the text before it."""
        self.flush()
        self.tokens.append(token_id)
        self.token_texts.append("")
        # the tag stays in the window as context (its decode is in both halves of the diff)
        self.prefix_offset, self.read_offset = len(self.tokens) - 1, len(self.tokens)
        return len(self.text)

    def flush(self) -> str:
        """At the end of the sequence: emit the held-back tokens' text even if it ends in an
        incomplete character (rendered U+FFFD, as `tokenizer.decode` does) and return it. Nothing
        once a stop string has ended the text."""
        if self.tokenizer is None or self.stopped_by is not None or self.num_pending == 0:
            return ""
        return self._emit(final=True, check_stop=True)

    def _emit(self, *, final: bool, check_stop: bool) -> str:
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return ""
        delta = full[len(prefix) :]
        pieces = self._split(len(prefix), full)
        self.token_texts[len(self.token_texts) - len(pieces) :] = pieces
        self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
        start = len(self.text)
        self.text += delta
        if check_stop and self.stop:
            self._check_stop(start)
        return delta

    def _split(self, settled: int, full: str) -> list[str]:
        """`full[settled:]` split over the held-back tokens: each gets what the decode up to it
        shares with `full` beyond what the tokens before it got; the last gets the rest."""
        pieces = []
        for end in range(self.read_offset + 1, len(self.tokens)):
            partial = self._decode(self.tokens[self.prefix_offset : end])
            common = max(settled, len(os.path.commonprefix([partial, full])))
            pieces.append(full[settled:common])
            settled = common
        pieces.append(full[settled:])
        return pieces

    def _check_stop(self, new_from: int) -> None:
        search_from = max(0, new_from - self.hold_back)
        best: tuple[int, str] | None = None
        for s in self.stop:
            i = self.text.find(s, search_from)
            if i != -1 and (best is None or i < best[0]):
                best = (i, s)
        if best is not None:
            i, s = best
            self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
            self.stopped_by = s

    def visible_length(self, finished: bool) -> int:
        """How much of `text` is safe to show: all once finished, else all but the held-back
        tail."""
        if finished or self.hold_back == 0:
            return len(self.text)
        return max(0, len(self.text) - self.hold_back)

    def visible_text(self, finished: bool) -> str:
        """Text safe to show: everything once finished, else all but the held-back tail."""
        return self.text[: self.visible_length(finished)]
