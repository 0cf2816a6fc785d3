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

Images: a chunk that reaches an image's placeholder tokens needs the image's encoder output,
either cached (encoder_cache.py) or computed this step. Each step may encode images worth at
most `encoder_budget` embeddings (the first image of a step is always allowed, so a large one
is never starved); a chunk is cut before the first image it cannot have this step.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from flatout.config import SchedulerConfig
from flatout.engine.block_manager import BlockManager
from flatout.engine.encoder_cache import EncoderCache
from flatout.engine.messages import MultiModalItem
from flatout.engine.request import FinishReason, Sequence, SequenceStatus


@dataclass
class Schedule:
    """What to compute this step: for each sequence, how many of its uncomputed tokens (the
    engine core turns it into the runner's `SchedulerOutput`, engine/batch.py)."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    encoder_inputs: list[MultiModalItem] = field(default_factory=list)  # to encode this step

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        encoder_budget: int | None = None,
        encoder_cache_size: int | None = None,
    ) -> None:
        """encoder_budget: image embeddings encoded per step at most; encoder_cache_size: the
        encoder outputs held at once (both in embeddings; default max_num_batched_tokens)."""
        self.config = config
        self.block_manager = block_manager
        self.encoder_budget = encoder_budget or config.max_num_batched_tokens
        self.encoder_cache = EncoderCache(encoder_cache_size or config.max_num_batched_tokens)
        self._encoded = 0  # image embeddings the step being scheduled encodes
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
        self._encoded = 0

        # decodes first, then unfinished prefills (stable within each group)
        order = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)
        for seq in order:
            if budget == 0:
                break
            if seq.seq_id in preempted or self._last_token_pending(seq):
                continue
            want = min(seq.num_uncomputed_tokens, budget)
            if want < seq.min_chunk:  # a prefix-LM context that does not fit beside the others
                if out.seqs:
                    continue
                want = seq.min_chunk  # alone in its step, past the budget
            n, encode = self._fit_images(seq, want)
            while n and not bm.can_grow(seq, n):
                victim = self._pick_victim(scheduled)
                self._preempt(victim)
                preempted.add(victim.seq_id)
                out.preempted.append(victim)
                if victim is seq:
                    n = 0
                else:  # the victim's release may have dropped an image output `seq` counted on
                    n, encode = self._fit_images(seq, want)
            if n:
                bm.grow(seq, n)
                self._use_images(seq, n, encode, out)
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
            n, encode = self._fit_images(seq, n)
            if n == 0 or not bm.can_grow(seq, n):
                bm.free(seq)  # give the prefix hits back; try again next step
                break
            bm.grow(seq, n)
            self._use_images(seq, n, encode, out)
            self.waiting.popleft()
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.seqs.append(seq)
            out.num_new_tokens.append(n)
            budget = max(0, budget - n)
        return out

    def _fit_images(self, seq: Sequence, n: int) -> tuple[int, list[MultiModalItem]]:
        """The chunk of `n` tokens from the sequence's first uncomputed one, cut before the
        first image whose encoder output it cannot have this step, and the images it must
        encode (not cached; within the step's encoder budget and the cache's capacity)."""
        if not seq.mm_items:
            return n, []
        start = seq.num_computed_tokens
        encode: list[MultiModalItem] = []
        encoded, adding = self._encoded, 0
        for item in seq.mm_items:
            if item.end <= start or item.content_hash in self.encoder_cache:
                continue
            if item.offset >= start + n:
                break
            if any(e.content_hash == item.content_hash for e in encode):
                continue
            over_budget = encoded > 0 and encoded + item.num_tokens > self.encoder_budget
            if over_budget or not self.encoder_cache.can_add(adding + item.num_tokens):
                return max(0, item.offset - start), encode
            encode.append(item)
            encoded += item.num_tokens
            adding += item.num_tokens
        return n, encode

    def _use_images(self, seq: Sequence, n: int, encode: list[MultiModalItem], out: Schedule
                    ) -> None:
        """Record the images the scheduled chunk encodes and the cached outputs it reads."""
        cache = self.encoder_cache
        for item in encode:
            cache.add(item.content_hash, item.num_tokens)
            self._encoded += item.num_tokens
            out.encoder_inputs.append(item)
        start = seq.num_computed_tokens
        for item in seq.mm_items:
            if item.end > start and item.offset < start + n:
                cache.use(item.content_hash, seq.seq_id)

    def _release_images(self, seq: Sequence, all_of_them: bool = False) -> None:
        """Release the encoder outputs the sequence has computed past (or all of them)."""
        for item in seq.mm_items:
            if all_of_them or item.end <= seq.num_computed_tokens:
                self.encoder_cache.release(item.content_hash, seq.seq_id)

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
        self._release_images(seq, all_of_them=True)
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
            self._release_images(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a sequence (finished or aborted) and release its blocks."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        self._release_images(seq, all_of_them=True)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
