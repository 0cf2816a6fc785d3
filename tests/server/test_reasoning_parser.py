"""The reasoning parser as a unit: whole texts and the same texts streamed in every split."""

from __future__ import annotations

import pytest

from flatout.server.reasoning import ReasoningParser, choose_reasoning_parser

P = ReasoningParser("glm45")


def stream_split(text: str, opened: bool, pieces: list[str]) -> tuple[str, str]:
    s = P.stream(opened=opened)
    reasoning = content = ""
    for piece in pieces:
        r, c = s.feed(piece)
        reasoning, content = reasoning + r, content + c
    r, c = s.finish()
    assert "".join(pieces) == text
    return reasoning + r, content + c


def splits(text: str) -> list[list[str]]:
    """Whole, char by char, and in two at every position."""
    out = [[text], list(text)]
    out += [[text[:i], text[i:]] for i in range(1, len(text))]
    return out


CASES = [
    # (output text, prompt opened <think>, reasoning, content)
    ("\nLet me think.\n</think>\n\nHello!", True, "Let me think.", "Hello!"),  # GLM-Z1 shape
    ("<think>\nhm, ok</think>Hi", False, "hm, ok", "Hi"),  # the model opens the tag itself
    ("  <think>a</think>\n b ", False, "a", "b "),
    ("Hi there", False, None, "Hi there"),  # no reasoning at all
    ("\n  Hi", False, None, "\n  Hi"),  # untagged text keeps its whitespace
    ("still thinking when cut off", True, "still thinking when cut off", ""),
    ("<think></think>\n\nok", False, "", "ok"),  # empty reasoning (thinking switched off)
    ("x </th", True, "x </th", ""),  # a partial closing tag at the very end
    ("a</think>b</think>c", True, "a", "b</think>c"),  # only the first tag splits
    ("<thinking> is not a tag", False, None, "<thinking> is not a tag"),
    # a `<think>` repeated right after the template opened one is not reasoning text
    ("<think>x</think>y", True, "x", "y"),
    ("<think>\n<think>x</think>y", False, "x", "y"),
]


@pytest.mark.parametrize(("text", "opened", "reasoning", "content"), CASES)
def test_split_whole_and_streamed(text: str, opened: bool, reasoning: str | None,
                                  content: str) -> None:
    assert P.split(text, opened=opened) == (reasoning, content)
    for pieces in splits(text):
        assert stream_split(text, opened, pieces) == (reasoning or "", content), pieces


def test_streamed_reasoning_never_leaks_a_partial_tag() -> None:
    s = P.stream(opened=True)
    emitted = []
    for ch in "plan </think>answer":
        r, c = s.feed(ch)
        emitted.append((r, c))
    reasoning = "".join(r for r, _ in emitted)
    assert "<" not in reasoning and reasoning == "plan"
    assert "".join(c for _, c in emitted) == "answer"


def test_prompt_opens_reasoning() -> None:
    assert P.prompt_opens_reasoning("<|user|>\nhi<|assistant|>\n<think>")
    assert P.prompt_opens_reasoning("<|assistant|>\n<think>\n")
    assert not P.prompt_opens_reasoning("<|assistant|>\n")
    assert not P.prompt_opens_reasoning("<|assistant|>\n<think></think>")


class _Tok:
    all_special_tokens = ["<|user|>"]

    def __init__(self, vocab: dict[str, int]) -> None:
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return self.vocab


def test_choose_parser() -> None:
    plain = _Tok({"a": 0})
    thinking = _Tok({"<think>": 0, "</think>": 1})
    assert choose_reasoning_parser("auto", architecture="Glm4ForCausalLM", chat_template="x",
                                   tokenizer=plain) is None
    got = choose_reasoning_parser("auto", architecture="Glm4ForCausalLM", chat_template="x",
                                  tokenizer=thinking)
    assert got is not None and got.name == "glm45"
    got = choose_reasoning_parser("auto", architecture="Qwen3ForCausalLM",
                                  chat_template="{{ '</think>' }}", tokenizer=None)
    assert got is not None and got.name == "qwen3"
    assert choose_reasoning_parser("none", architecture="Qwen3ForCausalLM",
                                   chat_template="</think>", tokenizer=thinking) is None
    got = choose_reasoning_parser("qwen3", architecture="LlamaForCausalLM", chat_template=None,
                                  tokenizer=None)
    assert got is not None and got.name == "qwen3"
    with pytest.raises(ValueError, match="reasoning-parser"):
        choose_reasoning_parser("deepseek", architecture="x", chat_template=None, tokenizer=None)
