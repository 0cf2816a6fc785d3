"""Sampling and stopping through the whole engine, on the built-in demo model (real tokenizer)."""

from __future__ import annotations

import pytest

from flatout import LLM, SamplingParams
from flatout.engine.detokenizer import IncrementalDetokenizer
from flatout.engine.llm_engine import RequestError
from flatout.sampling_params import SamplingParamsError

PROMPT = "The quick brown fox jumps over the lazy dog. 你好，世界！"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_num_seqs=16, num_kv_blocks=512)


def greedy(llm: LLM, max_tokens: int = 24, **kw) -> list:  # noqa: ANN003
    return llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=max_tokens, **kw))


def assert_clean(llm: LLM) -> None:
    bm = llm.engine.block_manager
    bm.check_integrity()
    assert bm.num_used_blocks == 0
    assert not llm.engine.has_unfinished_requests() and not llm.engine.core.has_unfinished()


def test_string_and_token_prompts_agree(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode(PROMPT)
    a = greedy(llm, ignore_eos=True)[0]
    b = llm.generate(ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids and a.text == b.text and a.prompt_token_ids == ids
    assert a.text == llm.get_tokenizer().decode(a.token_ids, skip_special_tokens=True)


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm: LLM) -> None:
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPT], p)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batch = llm.generate(["other prompt", PROMPT, "x y z"], [others, p, others])
    assert batch[1].token_ids == alone
    different = llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=99, max_tokens=16))
    assert different[0].token_ids != alone
    # the high 32 bits count too: 5 and 2**32 + 5 are different seeds
    five, high = (llm.generate([PROMPT], SamplingParams(temperature=1.0, seed=s, max_tokens=16,
                                                        ignore_eos=True))[0].token_ids
                  for s in (5, 2**32 + 5))
    assert five != high


def test_n_samples(llm: LLM) -> None:
    out = llm.generate([PROMPT], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert_clean(llm)


def test_stop_string_cuts_text_and_respects_include(llm: LLM) -> None:
    full = greedy(llm, ignore_eos=True)[0]
    text = full.text
    stop = next(
        text[i : i + 2] for i in range(3, len(text) - 2)
        if "\ufffd" not in text[i : i + 2] and text[i : i + 2].strip()
    )
    cut = text.index(stop)
    out = greedy(llm, ignore_eos=True, stop=[stop])[0]
    assert out.text == text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    kept = greedy(llm, ignore_eos=True, stop=stop, include_stop_str_in_output=True)[0]
    assert kept.text == text[: cut + len(stop)]
    assert_clean(llm)


def test_stop_token_ids_and_min_tokens(llm: LLM) -> None:
    first = greedy(llm, ignore_eos=True)[0].token_ids[0]
    out = greedy(llm, stop_token_ids=[first])[0]
    assert out.token_ids == [first] and out.finish_reason == "stop" and out.stop_reason == first
    assert out.text == ""  # the stop token is not part of the text
    held = greedy(llm, stop_token_ids=[first], min_tokens=5)[0]
    assert len(held.token_ids) >= 5 and held.token_ids[0] != first


def test_eos_from_generation_config_and_ignore_eos(llm: LLM) -> None:
    eos = llm.engine.inputs.eos_token_ids
    assert len(eos) == 3  # <|endoftext|>, <|user|>, <|observation|>
    tok = llm.get_tokenizer()
    assert set(eos) == {tok.convert_tokens_to_ids(t)
                        for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    # an EOS id given as a prompt continuation is never produced while below min_tokens
    out = greedy(llm, max_tokens=30, min_tokens=30)[0]
    assert len(out.token_ids) == 30 and not set(out.token_ids) & set(eos)


def test_max_tokens_length(llm: LLM) -> None:
    out = greedy(llm, max_tokens=5, ignore_eos=True)[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_logprobs(llm: LLM) -> None:
    out = greedy(llm, max_tokens=6, ignore_eos=True, logprobs=3)[0].outputs[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and len(lp.top) == 3
        best = max(lp.top, key=lambda t: lp.top[t])
        assert best == tok and lp.top[tok] == pytest.approx(lp.logprob)
        assert lp.logprob <= 0
    assert out.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in out.logprobs))


def test_too_long_requests_rejected_and_nothing_left_behind(llm: LLM) -> None:
    limit = llm.engine.model_config.max_model_len
    with pytest.raises(RequestError, match="max_model_len"):
        llm.generate([[1] * limit], SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="max_tokens"):
        llm.generate(["ok", [5] * 10], SamplingParams(max_tokens=limit))
    with pytest.raises(RequestError, match="vocabulary"):
        llm.generate([[10**9]], SamplingParams(max_tokens=1))
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=1))
    assert_clean(llm)


@pytest.mark.parametrize(
    ("field", "value"),
    [("temperature", -1.0), ("top_p", 0.0), ("top_k", -5), ("min_p", 1.5), ("n", 0),
     ("max_tokens", 0), ("presence_penalty", 3.0), ("repetition_penalty", 0.0),
     ("logprobs", 100), ("stop", [""]), ("stop_token_ids", [-1]), ("temperature", float("nan")),
     ("seed", 1.5), ("min_tokens", -1)],
)
def test_bad_sampling_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field and field in str(e.value)


def test_incremental_detokenization_streams_whole_characters(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    text = "naïve café — 你好，世界 🙂🚀 done"
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, tok.encode("prefix:"))
    deltas = [detok.add_token(t) for t in ids]
    assert "".join(deltas) == tok.decode(ids) == detok.text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_string_across_tokens_is_held_back_while_streaming(llm: LLM) -> None:
    tok = llm.get_tokenizer()
    ids = tok.encode("alpha beta gamma delta", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [], stop=["gamma"])
    seen = []
    for t in ids:
        detok.add_token(t)
        seen.append(detok.visible_text(finished=detok.stopped_by is not None))
        if detok.stopped_by:
            break
    assert detok.stopped_by == "gamma" and seen[-1] == "alpha beta "
    assert all("gam" not in s for s in seen)


def test_generate_tokenizes_each_prompt_once(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = llm.get_tokenizer()
    calls = []
    encode = tok.encode
    monkeypatch.setattr(tok, "encode", lambda *a, **kw: calls.append(a) or encode(*a, **kw))
    outs = llm.generate([PROMPT, "x y z"], SamplingParams(temperature=0, max_tokens=2))
    assert len(calls) == 2 and [o.prompt_token_ids for o in outs] == [encode(PROMPT),
                                                                     encode("x y z")]
