"""Splitting a reasoning model's `<think>…</think>` text from its answer.

Reasoning models (GLM-Z1, GLM-4.5, GLM-4.1V-Thinking, Qwen3) write their chain of thought between
`<think>` and `</think>`, then the answer. Some chat templates already open `<think>` at the end of
the prompt (GLM-Z1), so the output holds only the closing tag; the stream is then told it starts
inside the reasoning.

One state machine serves both the streaming and the whole-text case, so a streamed answer joins
up to exactly the non-streamed one. A tag split over several deltas is held back until it is
complete or ruled out; whitespace around the reasoning and at the start of the answer is dropped.
This text matching is for tokenizers where a tag is several tokens; where both are single tokens
the output is split by their ids instead, under the same rules (engine/reasoning_split.py).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any

from flatout.engine.reasoning_split import ReasoningTokens

PARSER_NAMES = ("auto", "glm45", "qwen3", "none")


class _State(enum.Enum):
    BEFORE = 0  # start of the output: a `<think>` may follow some whitespace
    REASONING_START = 1  # inside reasoning, leading whitespace not yet passed
    REASONING = 2
    ANSWER_START = 3  # after `</think>`, leading whitespace not yet passed
    ANSWER = 4


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningStream:
    """Feed the output text delta by delta; get (reasoning_delta, content_delta) back."""

    def __init__(self, start_tag: str, end_tag: str, *, opened: bool) -> None:
        self.start_tag = start_tag
        self.end_tag = end_tag
        self.state = _State.REASONING_START if opened else _State.BEFORE
        self.buf = ""
        self.saw_reasoning = opened

    def feed(self, delta: str) -> tuple[str, str]:
        self.buf += delta
        reasoning: list[str] = []
        content: list[str] = []
        while self._advance(reasoning, content):
            pass
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """Flush what was held back (the output ended)."""
        reasoning, content = self.feed("")
        rest, self.buf = self.buf, ""
        if self.state is _State.REASONING_START:
            reasoning += rest.strip()
        elif self.state is _State.REASONING:
            reasoning += rest.rstrip()
        elif self.state is _State.BEFORE:
            content += rest
        return reasoning, content

    def _advance(self, reasoning: list[str], content: list[str]) -> bool:
        """Consume what can be decided from the buffer; True if the state changed."""
        buf = self.buf
        match self.state:
            case _State.BEFORE | _State.REASONING_START:
                s = buf.lstrip()
                if not s or (self.start_tag.startswith(s) and s != self.start_tag):
                    return False  # undecided: whitespace or a partial `<think>` so far
                if s.startswith(self.start_tag):
                    self.buf = s[len(self.start_tag) :]
                    self.state = _State.REASONING_START
                    self.saw_reasoning = True
                    return True
                if self.state is _State.BEFORE:
                    self.state = _State.ANSWER  # no reasoning: the text is kept as it is
                else:
                    self.buf, self.state = s, _State.REASONING
                return True
            case _State.REASONING:
                i = buf.find(self.end_tag)
                if i != -1:
                    reasoning.append(buf[:i].rstrip())
                    self.buf, self.state = buf[i + len(self.end_tag) :], _State.ANSWER_START
                    return True
                held = _partial_suffix(buf, self.end_tag)
                safe = len(buf[: len(buf) - held].rstrip())  # trailing whitespace waits too
                reasoning.append(buf[:safe])
                self.buf = buf[safe:]
                return False
            case _State.ANSWER_START:
                s = buf.lstrip()
                if not s:
                    self.buf = ""
                    return False
                self.buf, self.state = s, _State.ANSWER
                return True
            case _State.ANSWER:
                content.append(buf)
                self.buf = ""
                return False
        return False


@dataclass(frozen=True)
class ReasoningParser:
    """Reasoning between `start_tag` and `end_tag`. The glm45 and qwen3 parsers share the
    tags and the rules; both names exist so launch lines written for vLLM carry over.

    With `tag_ids` (both tags single tokens of the vocabulary) the output processor splits the
    output where those tokens are generated (flatout/engine/reasoning_split.py), whether or not
    the tokenizer renders them in the text; otherwise the text is matched here."""

    name: str
    start_tag: str = "<think>"
    end_tag: str = "</think>"
    tag_ids: tuple[int, int] | None = None  # (start, end) token ids

    def reasoning_tokens(self, *, opened: bool) -> ReasoningTokens | None:
        """What the output processor needs to split a request's output by id (None: by text)."""
        if self.tag_ids is None:
            return None
        return ReasoningTokens(*self.tag_ids, opened=opened)

    def prompt_opens_reasoning(self, prompt: str) -> bool:
        """True when the template ended the prompt inside an open `<think>`."""
        return prompt.rstrip().endswith(self.start_tag)

    def stream(self, *, opened: bool) -> ReasoningStream:
        return ReasoningStream(self.start_tag, self.end_tag, opened=opened)

    def split(self, text: str, *, opened: bool) -> tuple[str | None, str]:
        """(reasoning or None, answer) of a whole output."""
        s = self.stream(opened=opened)
        r1, c1 = s.feed(text)
        r2, c2 = s.finish()
        reasoning = r1 + r2
        return (reasoning if s.saw_reasoning else None), c1 + c2



def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of the one vocabulary token that is `text`, or None when it takes several."""
    if tokenizer is None:
        return None
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)
        if len(ids) == 1 and tokenizer.decode(ids, skip_special_tokens=False) == text:
            return int(ids[0])
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        pass
    return None


def with_tag_ids(parser: ReasoningParser, tokenizer: Any) -> ReasoningParser:
    """`parser` splitting by id where both of its tags are single tokens of `tokenizer`."""
    start = single_token_id(tokenizer, parser.start_tag)
    end = single_token_id(tokenizer, parser.end_tag)
    if start is None or end is None:
        return parser
    return dataclasses.replace(parser, tag_ids=(start, end))


def choose_reasoning_parser(
    name: str, *, architecture: str, chat_template: str | None, tokenizer: Any
) -> ReasoningParser | None:
    """The parser `--reasoning-parser NAME` asks for; `auto` picks one when the chat template or
    the vocabulary knows `</think>`, by model family, and none otherwise."""
    if name not in PARSER_NAMES:
        choices = ", ".join(PARSER_NAMES)
        raise ValueError(f"--reasoning-parser must be one of {choices}, got {name!r}")
    if name == "none":
        return None
    if name != "auto":
        return with_tag_ids(ReasoningParser(name), tokenizer)
    knows_think = "</think>" in (chat_template or "")
    if not knows_think and tokenizer is not None:
        try:
            knows_think = "</think>" in tokenizer.get_vocab()
        except (AttributeError, NotImplementedError):
            knows_think = False
    if not knows_think:
        return None
    family = "qwen3" if architecture.lower().startswith("qwen") else "glm45"
    return with_tag_ids(ReasoningParser(family), tokenizer)
