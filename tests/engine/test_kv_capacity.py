"""A KV cache smaller than max_model_len, and prefix-cache accounting under preemption."""

from __future__ import annotations

import logging

import pytest

from flatout import LLM, SamplingParams
from flatout.engine.llm_engine import RequestError

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def small() -> LLM:
    # 6 blocks x 4 = 24 tokens of KV against the demo's max_model_len of 2048
    return LLM(block_size=4, num_kv_blocks=6, max_num_seqs=4, enable_prefix_caching=True)


def test_default_max_tokens_is_capped_by_the_kv_cache(small: LLM,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    assert small.engine.model_config.max_model_len > 24
    out = small.generate([PROMPT], SamplingParams(max_tokens=None, ignore_eos=True,
                                                  temperature=0))[0]
    n = len(out.prompt_token_ids)
    assert len(out.outputs[0].token_ids) == 24 - n and out.outputs[0].finish_reason == "length"
    with pytest.raises(RequestError, match="KV cache"):  # an explicit max_tokens is still checked
        small.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True))
    with pytest.raises(RequestError, match="KV cache holds 24 tokens"):
        small.generate([[1] * 24], SamplingParams(max_tokens=None))
    with caplog.at_level(logging.WARNING, logger="flatout.engine.input_processor"):
        LLM(block_size=4, num_kv_blocks=6)
    assert any("fewer than max_model_len" in r.getMessage() for r in caplog.records)


def test_cached_tokens_never_exceed_the_prompt_under_preemption(small: LLM) -> None:
    # four sequences growing in 24 tokens of KV: the later ones are preempted, and their
    # recomputation finds their own output blocks in the prefix cache
    before = small.engine.scheduler.num_preemptions
    prompts = [[5, 6, 7, 8, 9, i] for i in range(4)]
    outs = small.generate(prompts, SamplingParams(max_tokens=12, ignore_eos=True, temperature=0))
    assert small.engine.scheduler.num_preemptions > before
    for out in outs:
        assert out.num_cached_tokens <= len(out.prompt_token_ids), out
    # the shared prefix (one full block) is a real hit for the ones admitted after the first
    assert any(out.num_cached_tokens == 4 for out in outs)
