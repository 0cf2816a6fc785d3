"""A reasoning model's output split into reasoning and answer by the tags' token ids.

Where `<think>` and `</think>` are single tokens of the vocabulary, the split happens where those
tokens are generated, not where their text appears: a tokenizer may mark them special (then
`skip_special_tokens` erases them from the text), and the model writing the characters
"</think>" as several ordinary tokens inside its reasoning does not end it. Tokenizers where a
tag is several tokens keep the text parser (flatout/server/reasoning.py); both apply the same
rules: the reasoning starts at `<think>` (or at once when the prompt opened it), only
whitespace may come before `<think>` (other text first means no reasoning: all of it is the
answer, kept as is), whitespace around the reasoning and at the start of the answer is dropped.

Bytes of an incomplete character held back when `</think>` comes are flushed into the reasoning
as U+FFFD, as at the end of a sequence: no byte after the tag completes them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class ReasoningTokens:
    """The single-token tags of a request whose output is split by id."""

    start_id: int
    end_id: int
    opened: bool  # the prompt ended inside `<think>`: the output starts in the reasoning


class _Phase(enum.Enum):
    BEFORE = 0  # only whitespace so far: `<think>` may still come
    REASONING = 1
    ANSWER = 2  # after `</think>`
    NO_REASONING = 3  # text came before any `<think>`: everything is the answer


class ReasoningSplit:
    """One sample's split: fed each generated token (whether it is a tag) and the sample's text
    so far, it gives the reasoning and the answer seen so far, each growing only at its end, so
    that deltas of them join to the whole."""

    def __init__(self, tokens: ReasoningTokens) -> None:
        self.tokens = tokens
        self.phase = _Phase.REASONING if tokens.opened else _Phase.BEFORE
        self.reasoning_from = 0  # offsets into the sample's text
        self.reasoning_to: int | None = None
        self.answer_from = 0
        self.blank = True  # only whitespace since the reasoning's start (or the output's)

    @property
    def saw_reasoning(self) -> bool:
        return self.phase in (_Phase.REASONING, _Phase.ANSWER)

    def is_tag(self, token_id: int, held_back: bool) -> bool:
        """Whether `token_id`, generated next, is a tag where the text splits. `held_back`:
        bytes of the text are held back (they will be a character, so no longer blank)."""
        t = self.tokens
        if token_id == t.start_id:  # also a second one, before any reasoning text
            blank = self.blank and not held_back
            return blank and self.phase in (_Phase.BEFORE, _Phase.REASONING)
        return token_id == t.end_id and self.phase is _Phase.REASONING

    def tag(self, token_id: int, offset: int) -> None:
        """The tag `is_tag` accepted came at `offset` of the text."""
        if token_id == self.tokens.start_id:
            self.phase, self.reasoning_from = _Phase.REASONING, offset
        else:
            self.phase, self.reasoning_to, self.answer_from = _Phase.ANSWER, offset, offset

    def text_added(self, text: str) -> None:
        """The text after a token that was no tag: non-whitespace before `<think>` decides
        that there is no reasoning."""
        if self.blank and text[self.reasoning_from :].strip():
            self.blank = False
            if self.phase is _Phase.BEFORE:
                self.phase = _Phase.NO_REASONING

    def views(self, text: str, visible: int, done: bool) -> tuple[str, str]:
        """(reasoning, answer) of the first `visible` characters of `text`. While the reasoning
        runs its trailing whitespace is held back (more reasoning may follow it); so is
        everything while only whitespace came, unless `done`."""
        match self.phase:
            case _Phase.BEFORE:
                return "", (text[:visible] if done else "")
            case _Phase.NO_REASONING:
                return "", text[:visible]
            case _Phase.REASONING:
                return text[self.reasoning_from : visible].strip(), ""
        assert self.reasoning_to is not None
        reasoning = text[self.reasoning_from : min(self.reasoning_to, visible)].strip()
        return reasoning, text[self.answer_from : visible].lstrip()
