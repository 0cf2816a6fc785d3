"""The output processor's outputs are deltas: each holds only what its step added, for the
samples that advanced, and the deltas join (OutputAccumulator) to the whole output."""

from __future__ import annotations

from typing import Any

import pytest

from flatout.demo import ASSETS
from flatout.engine.messages import EngineCoreOutput, FinishReason, TokenLogprobs
from flatout.engine.output_processor import OutputProcessor
from flatout.engine.outputs import OutputAccumulator
from flatout.sampling_params import SamplingParams
from flatout.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer(ASSETS)


def _out(index: int, token: int, finish: FinishReason | None = None) -> EngineCoreOutput:
    return EngineCoreOutput("r", index, [token], [TokenLogprobs(token, -1.0, {token: -1.0})],
                            finish_reason=finish)


def test_each_delta_holds_only_its_step(tok: Any) -> None:
    ids = tok.encode("the model serves every batch so the tokens " * 20,
                     add_special_tokens=False)
    proc = OutputProcessor(tok)
    proc.add_request("r", None, [1, 2], SamplingParams(max_tokens=len(ids), logprobs=0))
    acc = OutputAccumulator(1)
    for step, token in enumerate(ids):
        last = step == len(ids) - 1
        (delta,), _ = proc.process([_out(0, token, FinishReason.LENGTH if last else None)])
        (o,) = delta.outputs
        assert o.token_ids == [token] and len(o.logprobs or []) <= 1 + step
        assert len(o.text) <= len(tok.decode([token])) + 8  # a step's text, not the output's
        # what went out in a delta is not kept: the processor holds only unsettled logprobs
        if not last:
            assert len(proc.requests["r"].samples[0].logprobs or []) <= 4
        acc.add(delta)
    whole = acc.result()
    assert "r" not in proc.requests
    assert whole.finished and whole.text == tok.decode(ids)
    assert whole.token_ids == ids and len(whole.outputs[0].logprobs or []) == len(ids)
    assert "".join(lp.text or "" for lp in whole.outputs[0].logprobs or []) == whole.text


def test_only_samples_that_advanced_are_listed(tok: Any) -> None:
    a, b = tok.encode("alpha beta", add_special_tokens=False)[:2]
    proc = OutputProcessor(tok)
    proc.add_request("r", None, [1, 2], SamplingParams(n=2, max_tokens=4))
    acc = OutputAccumulator(2)
    (d,), _ = proc.process([_out(0, a), _out(1, a)])
    assert [o.index for o in d.outputs] == [0, 1]
    acc.add(d)
    (d,), _ = proc.process([_out(1, b, FinishReason.LENGTH)])
    assert [o.index for o in d.outputs] == [1] and d.outputs[0].finish_reason == "length"
    assert not d.finished
    acc.add(d)
    d = proc.abort("r")
    assert d is not None and [(o.index, o.finish_reason) for o in d.outputs] == [(0, "abort")]
    acc.add(d)
    whole = acc.result()
    assert whole.finished and [o.token_ids for o in whole.outputs] == [[a], [a, b]]
    assert acc.finish_reasons() == ["abort", "length"] and acc.num_tokens() == [1, 2]


def test_kept_outputs_leave_the_collector_little_to_scan() -> None:
    """A request's kept tokens, texts and logprobs end up in tuples the collector no longer
    tracks (a full pass would otherwise visit every token's record: tens of ms per pass for
    n=128 x 1,000 tokens), and come back whole in `result`."""
    import gc

    from flatout.engine.outputs import CompletionOutput, OutputAccumulator, RequestOutput

    acc = OutputAccumulator(1)
    lps = [TokenLogprobs(t, -1.0 - t, {t: -1.0 - t, t + 1: -2.0}, f"w{t}") for t in range(600)]
    for t in range(600):
        acc.add(RequestOutput("r", None, [1], [CompletionOutput(
            0, f"w{t}", [t], None, logprobs=[lps[t]])], finished=False))
    for _ in range(3):  # a pass untracks a tuple once what it holds is untracked: one level a pass
        gc.collect()
    sample = acc._samples[0]
    for packed in (sample.texts, sample.token_ids, sample.logprobs):
        assert packed is not None
        assert packed._packs and not any(gc.is_tracked(p) for p in packed._packs)
    out = acc.result().outputs[0]
    assert out.text == "".join(f"w{t}" for t in range(600))
    assert out.token_ids == list(range(600))
    assert out.logprobs == lps
