"""Block manager: reference counting, prefix caching, LRU eviction, integrity under random use."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatout.engine.block_manager import BlockManager, NoFreeBlocksError
from flatout.engine.request import Sequence
from flatout.sampling_params import SamplingParams

_ids = iter(range(10**9))


def make_seq(tokens: list[int]) -> Sequence:
    return Sequence(
        seq_id=next(_ids), request_id="r", index=0, prompt_token_ids=list(tokens),
        params=SamplingParams(), max_tokens=16, arrival_time=0.0,
    )


def prefill(bm: BlockManager, seq: Sequence) -> None:
    """Admit and compute the whole sequence in one go, as the scheduler + runner would."""
    bm.admit(seq)
    n = seq.num_uncomputed_tokens
    bm.grow(seq, n)
    seq.num_computed_tokens += n
    bm.commit(seq)


def test_prefix_hit_shares_blocks_and_counts_tokens() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(10)))  # 2 full blocks + 2 tokens
    prefill(bm, a)
    b = make_seq(list(range(8)) + [99, 98, 97])
    bm.admit(b)
    assert b.num_cached_tokens == 8
    assert b.block_table == a.block_table[:2]
    assert bm.ref_counts[a.block_table[0]] == 2
    bm.check_integrity()


def test_whole_prompt_cached_still_computes_last_token() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    a = make_seq(list(range(8)))
    prefill(bm, a)
    bm.free(a)
    b = make_seq(list(range(8)))
    bm.admit(b)
    assert b.num_cached_tokens == 4  # the block holding the last token is recomputed
    assert b.num_uncomputed_tokens == 4


def test_freed_blocks_stay_cached_until_evicted_lru() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = make_seq([1, 2, 3, 4, 5])  # blocks: [1,2] [3,4] [5]
    prefill(bm, a)
    bm.free(a)
    assert len(bm.cached_blocks) == 2 and len(bm.free_blocks) == 2
    bm.check_integrity()
    b = make_seq([1, 2, 3, 4, 9])
    bm.admit(b)
    assert b.num_cached_tokens == 4
    bm.free(b)
    # a sequence with other tokens needs all 4 blocks: the cached ones are evicted
    c = make_seq([7] * 8)
    bm.admit(c)
    bm.grow(c, 8)
    assert bm.num_available_blocks == 0 and not bm.hash_to_block
    bm.check_integrity()
    with pytest.raises(NoFreeBlocksError):
        bm.grow(c, 9)


def test_eviction_order_is_least_recently_freed_first() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    old, new = make_seq([1, 2, 0]), make_seq([3, 4, 0])
    prefill(bm, old)
    prefill(bm, new)
    bm.free(old)
    bm.free(new)
    taker = make_seq([5, 6, 7, 8, 0])
    bm.admit(taker)
    bm.grow(taker, 3)  # 2 blocks: the 2 never-hashed free ones
    bm.grow(taker, 5)  # 3rd block: evicts the older cached block
    again = make_seq([3, 4, 0])
    bm.admit(again)
    assert again.num_cached_tokens == 2
    gone = make_seq([1, 2, 0])
    bm.admit(gone)
    assert gone.num_cached_tokens == 0


def test_disabled_prefix_caching_never_hits() -> None:
    bm = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = make_seq([1, 2, 3, 4, 5])
    prefill(bm, a)
    bm.free(a)
    b = make_seq([1, 2, 3, 4, 5])
    bm.admit(b)
    assert b.num_cached_tokens == 0 and not bm.cached_blocks
    bm.check_integrity()


def test_double_free_is_detected() -> None:
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = make_seq([1, 2, 3])
    prefill(bm, a)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(RuntimeError):
        bm.free(a)


# -- random operation sequences -------------------------------------------------------------
op = st.one_of(
    st.tuples(st.just("new"), st.integers(0, 3), st.integers(1, 12)),  # prefix family, length
    st.tuples(st.just("append"), st.integers(0, 50), st.integers(1, 5)),  # seq index, tokens
    st.tuples(st.just("free"), st.integers(0, 50), st.just(0)),
    st.tuples(st.just("reset"), st.just(0), st.just(0)),
)


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(op, min_size=1, max_size=60),
    num_blocks=st.integers(1, 12),
    block_size=st.sampled_from([1, 2, 3, 4]),
    caching=st.booleans(),
)
def test_random_operations_never_leak(
    ops: list[tuple[str, int, int]], num_blocks: int, block_size: int, caching: bool
) -> None:
    bm = BlockManager(num_blocks, block_size, caching)
    live: list[Sequence] = []
    families = [[f * 100 + i for i in range(40)] for f in range(4)]
    for kind, a, b in ops:
        if kind == "new":
            seq = make_seq(families[a][:b])
            bm.admit(seq)
            # cached blocks hold exactly the tokens they were registered with
            for i, h in enumerate(seq.block_hashes):
                assert bm.hash_to_block[h] == seq.block_table[i]
            n = seq.num_uncomputed_tokens
            if bm.can_grow(seq, n):
                bm.grow(seq, n)
                seq.num_computed_tokens += n
                bm.commit(seq)
                live.append(seq)
            else:
                bm.free(seq)
        elif kind == "append" and live:
            seq = live[a % len(live)]
            seq.token_ids.extend([7] * b)
            if bm.can_grow(seq, b):
                bm.grow(seq, b)
                seq.num_computed_tokens += b
                bm.commit(seq)
            else:
                del seq.token_ids[-b:]
        elif kind == "free" and live:
            bm.free(live.pop(a % len(live)))
        elif kind == "reset":
            bm.reset_prefix_cache()
        bm.check_integrity()
        held = sum(len(s.block_table) for s in live)
        assert sum(bm.ref_counts) == held
        for s in live:
            assert len(s.block_table) == bm.blocks_needed(s.num_computed_tokens)
    for s in live:
        bm.free(s)
    bm.check_integrity()
    assert bm.num_available_blocks == num_blocks


@settings(max_examples=100, deadline=None)
@given(length=st.integers(2, 30), block_size=st.sampled_from([1, 2, 4, 5]))
def test_cached_prefix_found_again(length: int, block_size: int) -> None:
    bm = BlockManager(64, block_size, True)
    tokens = list(range(length))
    a = make_seq(tokens)
    prefill(bm, a)
    bm.free(a)
    b = make_seq(tokens + [1000])
    bm.admit(b)
    assert b.num_cached_tokens == (length // block_size) * block_size
    bm.check_integrity()
