"""Scheduler: token budget, sequence cap, chunked prefill beside decodes, preemption."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from flatout.config import SchedulerConfig
from flatout.engine.block_manager import BlockManager
from flatout.engine.request import FinishReason, Sequence
from flatout.engine.scheduler import Schedule, Scheduler
from flatout.sampling_params import SamplingParams

_ids = iter(range(10**9))


def make_seq(prompt_len: int, max_tokens: int, base: int = 0) -> Sequence:
    return Sequence(
        seq_id=next(_ids), request_id=f"r{base}", index=0,
        prompt_token_ids=[base + i for i in range(prompt_len)],
        params=SamplingParams(max_tokens=max_tokens), max_tokens=max_tokens, arrival_time=0.0,
    )


def make(num_blocks: int, block_size: int, budget: int, max_seqs: int) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    return Scheduler(SchedulerConfig(max_seqs, budget, 10_000), bm)


def run_step(s: Scheduler) -> Schedule:
    """Schedule, 'compute', and append a token to every sequence that completed."""
    out = s.schedule()
    s.update_computed(out)
    for seq in out.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(1)
            if seq.num_output_tokens >= seq.max_tokens:
                s.finish(seq, FinishReason.LENGTH)
    s.block_manager.check_integrity()
    return out


def test_chunked_prefill_keeps_decodes_running() -> None:
    s = make(num_blocks=64, block_size=4, budget=8, max_seqs=8)
    short = make_seq(3, max_tokens=20, base=1000)
    s.add(short)
    run_step(s)  # short prefilled, now decoding
    long = make_seq(30, max_tokens=2, base=2000)
    s.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        out = run_step(s)
        assert out.num_batched_tokens <= 8
        assert short in out.seqs  # the decode runs every step beside the chunk
        assert out.num_new_tokens[out.seqs.index(short)] == 1
        chunks.append(out.num_new_tokens[out.seqs.index(long)])
    assert sum(chunks) == 30 and len(chunks) == 5  # 7 tokens a step beside the decode


def test_max_num_seqs_caps_the_batch() -> None:
    s = make(num_blocks=64, block_size=4, budget=1000, max_seqs=3)
    for i in range(5):
        s.add(make_seq(4, max_tokens=5, base=100 * i))
    out = run_step(s)
    assert len(out.seqs) == 3 and s.num_waiting == 2


def test_preemption_when_blocks_run_out_then_everyone_finishes() -> None:
    # 6 blocks of 4 = 24 slots; two sequences of 4 + 12 tokens need 8 blocks together
    s = make(num_blocks=6, block_size=4, budget=100, max_seqs=8)
    a, b = make_seq(4, max_tokens=12, base=0), make_seq(4, max_tokens=12, base=500)
    s.add(a)
    s.add(b)
    steps = 0
    while s.has_unfinished():
        run_step(s)
        steps += 1
        assert steps < 200
    assert s.num_preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0  # the later one yields
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    assert s.block_manager.num_available_blocks == 6


def test_abort_waiting_and_running_frees_everything() -> None:
    s = make(num_blocks=16, block_size=4, budget=6, max_seqs=8)
    a, b = make_seq(10, max_tokens=5, base=0), make_seq(10, max_tokens=5, base=50)
    s.add(a)
    s.add(b)
    run_step(s)  # a partially prefilled, b waiting
    s.finish(a, FinishReason.ABORT)
    s.finish(b, FinishReason.ABORT)
    assert not s.has_unfinished()
    assert s.block_manager.num_used_blocks == 0


@settings(max_examples=60, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 10)), min_size=1, max_size=10),
    num_blocks=st.integers(13, 40),  # the engine rejects requests larger than the cache
    budget=st.integers(1, 64),
    max_seqs=st.integers(1, 6),
    seed=st.integers(0, 1000),
)
def test_random_workloads_always_finish_without_leaks(
    lens: list[tuple[int, int]], num_blocks: int, budget: int, max_seqs: int, seed: int
) -> None:
    block_size = 4
    s = make(num_blocks, block_size, budget, max_seqs)
    rng = random.Random(seed)
    seqs = []
    pending = list(lens)
    steps = 0
    while pending or s.has_unfinished():
        if pending and rng.random() < 0.5:
            p, m = pending.pop()
            seq = make_seq(p, m, base=rng.choice([0, 0, 1000 * len(pending)]))
            seqs.append(seq)
            s.add(seq)
        out = run_step(s)
        assert out.num_batched_tokens <= budget
        assert len(s.running) <= max_seqs
        steps += 1
        assert steps < 5000, "no progress"
    assert all(seq.num_output_tokens == seq.max_tokens for seq in seqs)
    assert s.block_manager.num_used_blocks == 0
