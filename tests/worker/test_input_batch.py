"""The flattening of a scheduled step into the forward's inputs (CPU, no model)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flatout.engine.batch import ScheduledSeq, SchedulerOutput
from flatout.worker.input_batch import BlockTables, InputBatch


def row(seq_id: int, start: int, tokens: list[int], blocks: list[int], *, is_new: bool = True,
        pending_row: int | None = None, sample: bool = True) -> ScheduledSeq:
    return ScheduledSeq(seq_id, start, tokens, pending_row, is_new, blocks, sample)


def test_a_mixed_step_flattens_into_one_batch() -> None:
    bs = 4
    batch = SchedulerOutput([
        row(0, 0, [10, 11, 12, 13, 14, 15], [7, 3]),  # a whole prompt, samples
        row(1, 4, [20, 21, 22], [5, 9], sample=False),  # a chunk in the middle of a prompt
        row(2, 9, [], [2, 6, 8], pending_row=1),  # a decode of last step's pending token
    ])
    tables = BlockTables().apply(batch)
    flat = InputBatch.build(batch, tables, bs)
    assert flat.input_ids == [10, 11, 12, 13, 14, 15, 20, 21, 22, 0]
    assert flat.positions == [0, 1, 2, 3, 4, 5, 4, 5, 6, 9]
    assert flat.slot_mapping == [28, 29, 30, 31, 12, 13, 36, 37, 38, 33]
    assert flat.query_start_loc == [0, 6, 9, 10]
    assert flat.seq_lens == [6, 7, 10]
    assert flat.logits_rows == [5, 9]  # the last token of each sampled row
    assert (flat.pending_at, flat.pending_rows) == ([9], [1])
    assert flat.max_blocks == 3 and flat.block_tables == [7, 3, 0, 5, 9, 0, 2, 6, 8]
    assert flat.num_rows == 3 and flat.max_query_len == 6

    t = flat.to_device(torch.device("cpu"))
    assert t.input_ids.dtype == torch.int64 and t.input_ids.tolist() == flat.input_ids
    assert t.block_tables.shape == (3, 3) and t.block_tables[2].tolist() == [2, 6, 8]
    assert t.logits_rows.tolist() == [5, 9] and t.pending_at.tolist() == [9]
    assert t.query_start_loc.tolist() == flat.query_start_loc
    assert t.seq_lens.tolist() == flat.seq_lens and t.slot_mapping.tolist() == flat.slot_mapping


def test_block_tables_follow_the_deltas() -> None:
    tables = BlockTables()
    assert tables.apply(SchedulerOutput([row(0, 0, [1, 2, 3], [4]), row(1, 0, [5], [6])])) == [
        [4], [6]]
    step = SchedulerOutput([row(0, 3, [9], [8], is_new=False), row(1, 1, [9], [], is_new=False)])
    assert tables.apply(step) == [[4, 8], [6]]
    # sequence 1 finished; sequence 0 was preempted and comes back with a new table
    step = SchedulerOutput([row(0, 0, [1, 2, 3, 9, 9], [1, 2])], finished_seq_ids=[1])
    assert tables.apply(step) == [[1, 2]]
    assert tables.tables == {0: [1, 2]}


@settings(max_examples=80, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 40), st.integers(1, 12), st.booleans(), st.booleans()),
        min_size=1, max_size=8,
    ),
    block_size=st.integers(1, 8),
)
def test_every_token_lands_in_its_own_slot(
    rows: list[tuple[int, int, bool, bool]], block_size: int
) -> None:
    """Per token: its id (or the pending marker), position, and the slot of its block."""
    seqs, next_block = [], 0
    for i, (start, n, pending, sample) in enumerate(rows):
        num_blocks = -(-(start + n) // block_size)
        blocks = list(range(next_block, next_block + num_blocks))[::-1]  # any order
        next_block += num_blocks
        tokens = [1000 * i + j for j in range(n - pending)]
        seqs.append(row(i, start, tokens, blocks, pending_row=i if pending else None,
                        sample=sample or pending))
    batch = SchedulerOutput(seqs)
    tables = BlockTables().apply(batch)
    flat = InputBatch.build(batch, tables, block_size)
    assert len(flat.input_ids) == len(flat.positions) == len(flat.slot_mapping)
    assert flat.query_start_loc[-1] == sum(s.num_tokens for s in seqs)
    for s, table, a, b in zip(seqs, tables, flat.query_start_loc, flat.query_start_loc[1:],
                              strict=False):
        assert b - a == s.num_tokens
        assert flat.positions[a:b] == list(range(s.start, s.end))
        assert flat.input_ids[a : a + len(s.token_ids)] == s.token_ids
        for p, slot in zip(range(s.start, s.end), flat.slot_mapping[a:b], strict=True):
            assert slot == table[p // block_size] * block_size + p % block_size
        if s.pending_row is not None:
            assert (b - 1) in flat.pending_at
            assert flat.pending_rows[flat.pending_at.index(b - 1)] == s.pending_row
        assert ((b - 1) in flat.logits_rows) == s.sample
    assert flat.seq_lens == [s.end for s in seqs]
    assert len(flat.block_tables) == len(seqs) * flat.max_blocks
