"""What rank 0 sends the other tensor-parallel ranks: the resolved configs at start, then each
step's `SchedulerOutput`, pickled.

Driven by the real scheduler and block manager (with preemptions and prefix hits) and the
engine core's overlap bookkeeping: the pickled step round-trips, the block tables a worker
rebuilds from the deltas are the driver's, and its flattened inputs are the driver's."""

from __future__ import annotations

import dataclasses
import pickle
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatout.config import EngineArgs, SchedulerConfig
from flatout.engine.batch import BlockTableSync, SchedulerOutput
from flatout.engine.block_manager import BlockManager
from flatout.engine.engine_core import sampling_info, scheduler_output
from flatout.engine.request import FinishReason, Sequence
from flatout.engine.scheduler import Scheduler
from flatout.models.registry import resolve_model
from flatout.sampling_params import SamplingParams
from flatout.worker.control import StepMessage
from flatout.worker.input_batch import BlockTables, InputBatch
from flatout.worker.parallel import decode_config, encode_config

_ids = iter(range(10**9))


def make_seq(prompt: list[int], max_tokens: int, min_tokens: int = 1) -> Sequence:
    return Sequence(
        seq_id=next(_ids), request_id="r", index=0, prompt_token_ids=prompt,
        params=SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=[3]),
        max_tokens=max_tokens, arrival_time=0.0,
    )


def roundtrip(batch: SchedulerOutput) -> SchedulerOutput:
    msg = pickle.loads(pickle.dumps(StepMessage(batch), protocol=pickle.HIGHEST_PROTOCOL))
    assert msg.batch is not None and not msg.stop
    return msg.batch


def run_workload(lens: list[tuple[int, int]], num_blocks: int, budget: int, max_seqs: int,
                 seed: int, block_size: int = 4) -> int:
    """The engine's loop without a model: launch step N+1, then collect step N. Returns the
    number of steps with a pending-token row."""
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    sched = Scheduler(SchedulerConfig(max_seqs, budget, 10_000), bm)
    sync = BlockTableSync()
    driver, worker = BlockTables(), BlockTables()
    todo = list(lens)
    in_flight: list[Sequence] | None = None
    finished: set[int] = set()
    steps = pending_steps = 0
    while todo or sched.has_unfinished() or in_flight:
        if todo and rng.random() < 0.5:
            p, m = todo.pop()
            base = rng.choice([0, 0, 100 * len(todo)])
            sched.add(make_seq([base + i for i in range(p)], m))
        s = sched.schedule()
        for seq in s.preempted:
            sync.reset(seq.seq_id)
        launched = None
        if not s.is_empty:
            batch = scheduler_output(s, sync)
            sent = roundtrip(batch)
            # the worker's copy: the same rows without the sampling details only rank 0 uses
            assert [r.sampling for r in sent.seqs] == [None] * len(sent.seqs)
            assert all(r.sampling is not None for r in batch.sampled)
            for a, b in zip(batch.seqs, sent.seqs, strict=True):
                a_vals = (a.seq_id, a.start, a.token_ids, a.pending_row, a.is_new,
                          a.new_block_ids, a.sample)
                assert a_vals == (b.seq_id, b.start, b.token_ids, b.pending_row, b.is_new,
                                  b.new_block_ids, b.sample)
            assert sent.finished_seq_ids == batch.finished_seq_ids
            assert set(batch.finished_seq_ids) <= finished
            # the tables rebuilt from the deltas are the scheduler's, on both sides
            tables = driver.apply(batch)
            assert tables == [seq.block_table for seq in s.seqs]
            assert worker.apply(sent) == tables
            assert not set(worker.tables) & set(batch.finished_seq_ids)
            # ... and so are the flattened inputs
            assert InputBatch.build(sent, tables, block_size) == InputBatch.build(
                batch, tables, block_size)
            # a pending-token row reads the row that sampled it in the step in flight
            for seq, r in zip(s.seqs, batch.seqs, strict=True):
                assert r.start == seq.num_computed_tokens and r.end <= len(seq.block_table) * 4
                if r.pending_row is not None:
                    assert in_flight is not None and in_flight[r.pending_row] is seq
                    assert r.sample and r.num_tokens == 1
            pending_steps += any(r.pending_row is not None for r in batch.seqs)
            sched.update_computed(s)
            launched = [seq for seq, r in zip(s.seqs, batch.seqs, strict=True) if r.sample]
            for i, seq in enumerate(launched):
                seq.pending.launched(i)
        previous, in_flight = in_flight, launched
        for seq in previous or []:
            seq.pending.collected()
            if seq.is_finished:
                continue
            seq.token_ids.append(1 + seq.num_output_tokens % 2)
            bm.commit(seq)
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq, FinishReason.LENGTH)
                sync.finish(seq.seq_id)
                finished.add(seq.seq_id)
        bm.check_integrity()
        steps += 1
        assert steps < 5000, "no progress"
    assert bm.num_used_blocks == 0
    return pending_steps


def test_a_workload_with_preemptions_round_trips() -> None:
    assert run_workload([(9, 6), (5, 12), (14, 3), (5, 12)], num_blocks=10, budget=8,
                        max_seqs=4, seed=1) > 0


@settings(max_examples=40, deadline=None)
@given(
    lens=st.lists(st.tuples(st.integers(1, 30), st.integers(1, 8)), min_size=1, max_size=8),
    num_blocks=st.integers(11, 30),
    budget=st.integers(1, 48),
    max_seqs=st.integers(1, 5),
    seed=st.integers(0, 1000),
)
def test_random_workloads_round_trip(lens: list[tuple[int, int]], num_blocks: int, budget: int,
                                     max_seqs: int, seed: int) -> None:
    run_workload(lens, num_blocks, budget, max_seqs, seed)


def test_min_tokens_ban_counts_the_pending_token() -> None:
    """The engine core bans the stop ids while the output (pending token included) is under
    min_tokens; the runner is only told the ids."""
    seq = make_seq([5, 6, 7], max_tokens=5, min_tokens=2)
    assert sampling_info(seq).banned_token_ids == [3]
    seq.token_ids.append(9)  # one output
    assert sampling_info(seq).banned_token_ids == [3]
    seq.pending.launched(0)  # a second, still on the device
    assert sampling_info(seq).banned_token_ids == []


def test_workers_get_the_resolved_configs() -> None:
    """Rank 0 resolves every component's config once; its workers get them as they are."""
    args = EngineArgs(model="glm-4-9b", load_format="dummy", max_num_seqs=7, block_size=8,
                      num_kv_blocks=100, tensor_parallel_size=2, enforce_eager=True)
    config = args.resolve(resolve_model(args, "cpu"))
    assert config.scheduler.max_num_seqs == 7
    assert config.scheduler.max_model_len == config.model.max_model_len
    assert (config.cache.block_size, config.cache.num_blocks) == (8, 100)
    assert config.parallel.tensor_parallel_size == 2 and config.runner.enforce_eager
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.cache.block_size = 4  # type: ignore[misc]
    assert decode_config(encode_config(config)) == config
