"""Prefix-LM (ChatGLM-6B v1) sequences: the context before <sop> is computed in one step, never
cut by the budget; the prefix cache chains from the context."""

from __future__ import annotations

from flatout.engine.batch import PrefixLayout
from flatout.engine.block_manager import BlockManager
from flatout.engine.request import FinishReason, Sequence
from tests.engine.test_scheduler import make, make_seq, run_step

GMASK, SOP = 900, 901


def prefix_seq(context: int, max_tokens: int, base: int, after: int = 0) -> Sequence:
    """context text tokens (the last one [gMASK]), then <sop>, then `after` causal tokens."""
    seq = make_seq(context - 1, max_tokens, base)
    seq.prompt_token_ids += [GMASK, SOP] + list(range(7, 7 + after))
    seq.token_ids = list(seq.prompt_token_ids)
    seq.prefix = PrefixLayout.of(seq.prompt_token_ids, SOP, (GMASK,))
    return seq


def test_a_context_waits_for_room_then_runs_whole_and_alone() -> None:
    s = make(num_blocks=64, block_size=4, budget=8, max_seqs=8)
    short = prefix_seq(2, max_tokens=20, base=1000)
    s.add(short)
    run_step(s)  # 3 tokens, now decoding
    long = prefix_seq(20, max_tokens=2, base=2000, after=5)  # context 20 > budget 8
    s.add(long)
    out = run_step(s)
    assert out.seqs == [short]  # the context does not fit beside the decode: it waits
    s.finish(short, FinishReason.STOP)
    out = run_step(s)
    assert out.seqs == [long] and out.num_new_tokens == [20]  # whole context, past the budget
    out = run_step(s)
    assert out.num_new_tokens == [6]  # <sop> and the causal tokens after it are chunkable


def test_a_context_that_fits_is_never_split() -> None:
    s = make(num_blocks=64, block_size=4, budget=10, max_seqs=8)
    first = prefix_seq(4, max_tokens=3, base=1000)
    second = prefix_seq(8, max_tokens=3, base=2000)
    s.add(first)
    s.add(second)
    out = run_step(s)
    # first takes 5; 5 are left, fewer than second's context of 8: it waits whole
    assert out.seqs == [first] and out.num_new_tokens == [5]
    out = run_step(s)
    assert second in out.seqs and out.num_new_tokens[out.seqs.index(second)] == 9


def test_prefix_cache_blocks_chain_from_the_context() -> None:
    bm = BlockManager(64, 4, enable_prefix_caching=True)
    a = prefix_seq(12, max_tokens=1, base=0)
    b = prefix_seq(12, max_tokens=1, base=0)
    b.prompt_token_ids[10] = 555  # same first 8 tokens, another context
    b.token_ids = list(b.prompt_token_ids)
    b.prefix = PrefixLayout.of(b.prompt_token_ids, SOP, (GMASK,))
    bm.admit(a)
    bm.grow(a, a.num_tokens)
    a.num_computed_tokens = a.num_tokens
    bm.commit(a)
    bm.free(a)
    same = prefix_seq(12, max_tokens=1, base=0)
    bm.admit(same)
    assert same.num_cached_tokens == 12  # equal context: its full blocks are reused
    bm.free(same)
    bm.admit(b)
    assert b.num_cached_tokens == 0  # the first two blocks' tokens match, their K/V do not
    bm.check_integrity()
