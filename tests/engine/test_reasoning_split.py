"""The reasoning split by the tags' token ids (engine/reasoning_split.py) on the demo tokenizer,
whose `<think>` and `</think>` are single tokens, and on a copy of it that marks them special
(so `skip_special_tokens` erases them from the text): reasoning and answer come out the same
either way and the same as the text parser's on the unsplit text, streamed deltas join to them,
and an incomplete character before `</think>` or at the end is flushed as U+FFFD."""

from __future__ import annotations

import random
from typing import Any

import pytest

from flatout.demo import ASSETS
from flatout.engine.messages import EngineCoreOutput, FinishReason
from flatout.engine.output_processor import OutputProcessor
from flatout.engine.outputs import CompletionOutput, OutputAccumulator
from flatout.engine.reasoning_split import ReasoningTokens
from flatout.sampling_params import SamplingParams
from flatout.server.reasoning import ReasoningParser, choose_reasoning_parser
from flatout.tokenizers import load_tokenizer
from tests.engine.test_detokenizer_utf8 import NUM_TRAINED, byte_ids

THINK, END = 4094, 4095  # the demo tokenizer's <think> and </think>


@pytest.fixture(scope="module")
def demo_tok() -> Any:
    return load_tokenizer(ASSETS)


@pytest.fixture(scope="module")
def special_tok() -> Any:
    tok = load_tokenizer(ASSETS)
    tok.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    assert {"<think>", "</think>"} <= set(tok.all_special_tokens)
    return tok


def _generate(tok: Any, ids: list[int], *, opened: bool, by_id: bool = True,
              skip_special_tokens: bool = True, stream: bool = True) -> CompletionOutput:
    """Run `ids` through the output processor (one token a step, or all in one step) and
    join the deltas, as `LLM.generate` and a non-streamed response do."""
    proc = OutputProcessor(tok)
    params = SamplingParams(max_tokens=len(ids), skip_special_tokens=skip_special_tokens)
    split = ReasoningTokens(THINK, END, opened=opened) if by_id else None
    proc.add_request("r", None, [5, 6], params, split)
    acc = OutputAccumulator(1)
    steps = [[t] for t in ids] if stream else [ids]
    for k, step in enumerate(steps):
        last = k == len(steps) - 1
        out = EngineCoreOutput("r", 0, step, finish_reason=FinishReason.LENGTH if last else None)
        deltas, _ = proc.process([out])
        for d in deltas:
            acc.add(d)
    return acc.result().outputs[0]


def _ids(tok: Any, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("opened", [True, False])
def test_special_tags_are_found_by_id_whatever_skip_special_tokens(
    special_tok: Any, demo_tok: Any, opened: bool
) -> None:
    ids = ([] if opened else [THINK]) + _ids(demo_tok, " think about it ") + [END] + _ids(
        demo_tok, "\n\nthe answer")
    # the text alone has lost the tags: a text parser could not split it
    assert special_tok.decode(ids, skip_special_tokens=True) == " think about it \n\nthe answer"
    for tok in (special_tok, demo_tok):
        for skip in (True, False):
            for stream in (True, False):
                out = _generate(tok, ids, opened=opened, skip_special_tokens=skip,
                                stream=stream)
                assert (out.reasoning, out.text) == ("think about it", "the answer")
                assert out.token_ids == ids


def test_the_characters_of_a_tag_in_ordinary_tokens_do_not_end_the_reasoning(
    demo_tok: Any,
) -> None:
    literal = _ids(demo_tok, "a </") + _ids(demo_tok, "think>") + _ids(demo_tok, " b")
    assert END not in literal and demo_tok.decode(literal) == "a </think> b"
    out = _generate(demo_tok, [*literal, END, *_ids(demo_tok, "ok")], opened=True)
    assert (out.reasoning, out.text) == ("a </think> b", "ok")
    # the text parser on the same text ends the reasoning at the characters
    text = demo_tok.decode([*literal, END, *_ids(demo_tok, "ok")])
    assert ReasoningParser("glm45").split(text, opened=True) == ("a", "b</think>ok")


def test_text_before_think_means_no_reasoning(special_tok: Any) -> None:
    ids = [*_ids(special_tok, "hello "), THINK, *_ids(special_tok, "x"), END]
    out = _generate(special_tok, ids, opened=False)
    assert out.reasoning is None and out.text == "hello x"
    # only whitespace before <think>, and an empty reasoning: reasoning "" (not None)
    out = _generate(special_tok, [*_ids(special_tok, " \n"), THINK, END, *_ids(special_tok, "y")],
                    opened=False)
    assert (out.reasoning, out.text) == ("", "y")
    out = _generate(special_tok, _ids(special_tok, "  "), opened=False)  # ended undecided
    assert out.reasoning is None and out.text == "  "


def test_same_split_as_the_text_parser_on_random_outputs(demo_tok: Any) -> None:
    """Where the tags are ordinary tokens the text parser sees them too: both splits agree,
    streamed or not, tags anywhere (a second <think>, </think> before any <think>, ...)."""
    parser = ReasoningParser("glm45")
    ws = _ids(demo_tok, " ") + _ids(demo_tok, "\n")
    rng = random.Random(3)
    for _ in range(200):
        ids = [rng.choice([THINK, END, *ws, *ws, rng.randrange(NUM_TRAINED)])
               for _ in range(rng.randint(1, 12))]
        text = demo_tok.decode(ids, skip_special_tokens=False)
        if text.count("<think>") != ids.count(THINK) or text.count("</think>") != ids.count(END):
            continue  # the tags' characters made from ordinary tokens: only ids tell them apart
        opened = rng.random() < 0.5
        want = parser.split(text, opened=opened)
        for stream in (True, False):
            out = _generate(demo_tok, ids, opened=opened, skip_special_tokens=False,
                            stream=stream)
            assert (out.reasoning, out.text) == want, (ids, opened)


def test_streamed_deltas_join_and_hold_back_trailing_whitespace(special_tok: Any) -> None:
    proc = OutputProcessor(special_tok)
    proc.add_request("r", None, [5], SamplingParams(max_tokens=50),
                     ReasoningTokens(THINK, END, opened=True))
    ids = [*_ids(special_tok, "step one "), *_ids(special_tok, "\n"), END,
           *_ids(special_tok, " done")]
    deltas = []
    for k, t in enumerate(ids):
        out = EngineCoreOutput("r", 0, [t], finish_reason=FinishReason.STOP
                               if k == len(ids) - 1 else None, stop_reason="x")
        deltas += [(d.outputs[0].reasoning, d.outputs[0].text) for d in proc.process([out])[0]]
    reasoning = "".join(r or "" for r, _ in deltas)
    assert reasoning == "step one" and "".join(t for _, t in deltas) == "done"
    assert all(not (r or "").endswith((" ", "\n")) for r, _ in deltas)  # held back, then dropped


def test_incomplete_character_before_the_tag_and_at_the_end_is_flushed_as_fffd(
    special_tok: Any,
) -> None:
    """Decided once for every path: bytes that are no whole character when the reasoning
    ends, or when the sequence ends, become U+FFFD (as `tokenizer.decode` renders them)."""
    cut = "é🙂".encode()[:-2]  # é, then half of 🙂
    ids = [*byte_ids(special_tok, cut), END, *_ids(special_tok, "ok"),
           *byte_ids(special_tok, "🙂".encode()[:3])]
    for stream in (True, False):
        out = _generate(special_tok, ids, opened=True, stream=stream)
        assert (out.reasoning, out.text) == ("é\ufffd", "ok\ufffd")
    # without a split the same bytes end the text the same way, as decode renders them
    plain = _generate(special_tok, ids, opened=True, by_id=False, skip_special_tokens=False)
    assert plain.text == special_tok.decode(ids, skip_special_tokens=False) == (
        "é\ufffd</think>ok\ufffd")


def test_the_parser_splits_by_id_only_where_both_tags_are_single_tokens(
    special_tok: Any,
) -> None:
    got = choose_reasoning_parser("auto", architecture="Glm4ForCausalLM", chat_template=None,
                                  tokenizer=special_tok)
    assert got is not None and got.tag_ids == (THINK, END)
    assert got.reasoning_tokens(opened=True) == ReasoningTokens(THINK, END, opened=True)

    class _Words:  # a tokenizer without such tokens: "</think>" is three of them
        def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
            return [1, 2, 3] if text == "</think>" else [7]

        def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
            return "<think>" if ids == [7] else "?"

    text_only = choose_reasoning_parser("qwen3", architecture="Qwen3ForCausalLM",
                                        chat_template=None, tokenizer=_Words())
    assert text_only is not None and text_only.tag_ids is None
    assert text_only.reasoning_tokens(opened=False) is None
