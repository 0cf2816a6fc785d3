"""Continuous batching with chunked prefill (pure Python, no torch).

Each step gets a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`).
Running sequences go first — decodes (one token each) before unfinished prefills, so a long
prompt being prefilled in chunks never stalls the decodes beside it — then waiting sequences
are admitted first-come first-served, their prompts cut to whatever budget is left.

Prefix-LM models (ChatGLM-6B v1): a prompt's bidirectional context is computed in one step, never
cut into chunks (each of its tokens' K/V depends on all of it); one longer than the budget left
waits for the next step, and one longer than the whole budget runs alone in a step of its own.

When the KV cache runs out, the most recently admitted running sequence is preempted: its blocks
are released (they stay in the prefix cache while nobody needs them) and it goes back to the
front of the queue, to be recomputed from its prompt and the tokens it had produced.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from flatout.config import SchedulerConfig
from flatout.engine.block_manager import BlockManager
from flatout.engine.request import FinishReason, Sequence, SequenceStatus


@dataclass
class Schedule:
    """What to compute this step: for each sequence, how many of its uncomputed tokens (the
    engine core turns it into the runner's `SchedulerOutput`, engine/batch.py)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the tail is preempted first
        self.num_preemptions = 0

    # -- queue ------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # -- one step ---------------------------------------------------------------------------
    def schedule(self) -> Schedule:
        out = Schedule()
        budget = self.config.max_num_batched_tokens
        bm = self.block_manager
        scheduled: set[int] = set()
        preempted: set[int] = set()

        # decodes first, then unfinished prefills (stable within each group)
        order = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)
        for seq in order:
            if budget == 0:
                break
            if seq.seq_id in preempted or self._last_token_pending(seq):
                continue
            n = min(seq.num_uncomputed_tokens, budget)
            if n < seq.min_chunk:  # a prefix-LM context that does not fit beside the others
                if out.seqs:
                    continue
                n = seq.min_chunk  # alone in its step, past the budget
            while not bm.can_grow(seq, n):
                victim = self._pick_victim(scheduled)
                self._preempt(victim)
                preempted.add(victim.seq_id)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                bm.grow(seq, n)
                out.seqs.append(seq)
                out.num_new_tokens.append(n)
                scheduled.add(seq.seq_id)
                budget = max(0, budget - n)

        # admit waiting sequences, unless this step already had to preempt
        while (
            self.waiting
            and budget > 0
            and not out.preempted
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            if seq.num_pending_tokens:  # preempted with a token in flight: known next step
                break
            bm.admit(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            if n < seq.min_chunk:  # a prefix-LM context longer than what is left of the budget
                if out.seqs:
                    bm.free(seq)  # admitted next step, alone if it must
                    break
                n = seq.min_chunk
            if not bm.can_grow(seq, n):
                bm.free(seq)  # give the prefix hits back; try again next step
                break
            bm.grow(seq, n)
            self.waiting.popleft()
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget = max(0, budget - n)
        return out

    def _last_token_pending(self, seq: Sequence) -> bool:
        """The sequence's pending token is its last (length limits): nothing left to compute."""
        return seq.num_pending_tokens > 0 and (
            seq.num_generated_tokens >= seq.max_tokens
            or seq.num_tokens + seq.num_pending_tokens >= self.config.max_model_len
        )

    def _pick_victim(self, scheduled: set[int]) -> Sequence:
        """The most recently admitted running sequence not yet scheduled this step."""
        for seq in reversed(self.running):
            if seq.seq_id not in scheduled:
                return seq
        raise RuntimeError("no sequence left to preempt")  # unreachable: the caller is unscheduled

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    # -- after the step ---------------------------------------------------------------------
    def update_computed(self, out: Schedule) -> None:
        """Record that the scheduled tokens are computed (or being computed: the step is
        launched); cache newly full blocks whose tokens are all known."""
        for seq, n in zip(out.seqs, out.num_new_tokens, strict=True):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a sequence (finished or aborted) and release its blocks."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
