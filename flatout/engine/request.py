"""A sequence being generated: its tokens, how many of them are in the KV cache, its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from flatout.engine.batch import PrefixLayout
from flatout.engine.messages import FinishReason, MultiModalItem, TokenLogprobs
from flatout.sampling_params import SamplingParams

__all__ = ["FinishReason", "Sequence", "SequenceStatus", "TokenLogprobs"]


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class PendingToken:
    """The overlap scheduling's pending token of one sequence, kept in one place.

    The engine launches step N+1 before it reads step N's sampled tokens back (so the device
    never waits for the host), so a sequence may have tokens sampled on the device that are not
    in its `token_ids` yet. `count` says how many (at most one whenever the scheduler runs), and
    `row` where the latest one is: its row among the sampled tokens of the step that sampled it,
    which the next step reads on the device. The engine core calls `launched` when a step that
    samples the sequence is queued and `collected` when that token is read back."""

    count: int = 0
    row: int | None = None

    def launched(self, row: int) -> None:
        self.count += 1
        self.row = row

    def collected(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.row = None


@dataclass(eq=False)
class Sequence:
    """One generated continuation. A request with n > 1 owns n sequences.

    Invariant: `num_computed_tokens <= num_tokens + num_pending_tokens`; tokens
    [0, num_computed_tokens) have their K/V in the blocks of `block_table` (or will have, once
    the step in flight finishes). A sequence needs to compute the rest before it samples.
    Tokens sampled but not read back yet are counted by `pending` (see `PendingToken`).
    """

    seq_id: int
    request_id: str
    index: int  # position among the request's n outputs
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens or what max_model_len leaves
    arrival_time: float
    eos_token_ids: tuple[int, ...] = ()  # the model's end-of-turn ids (ignored with ignore_eos)
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    pending: PendingToken = field(default_factory=PendingToken)  # sampled, not in token_ids
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache on admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of full blocks
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[TokenLogprobs] | None = None
    cumulative_logprob: float = 0.0
    num_preemptions: int = 0
    first_scheduled_time: float | None = None  # when it was first admitted (queue time ends)
    first_token_time: float | None = None
    # prefix-LM models: the prompt's layout; its bidirectional context is computed in one step
    # (never split across chunks) and seeds the prefix cache's block hashes
    prefix: PrefixLayout | None = None
    # images: their placeholder ranges in the prompt (in order), the prompt's 3-D M-RoPE
    # positions (t, h, w rows over the prompt) and the rope delta: a token at index i past the
    # prompt sits at i + rope_delta on all three axes. Text-only: [], None, 0.
    mm_items: list[MultiModalItem] = field(default_factory=list)
    mrope_positions: tuple[list[int], list[int], list[int]] | None = None
    rope_delta: int = 0
    # GLM-4V-9B: the prompt's 1-D positions (an image's span shares three of them); a token at
    # index i past the prompt sits at i + rope_delta. None: token i at position i.
    prompt_positions: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_pending_tokens(self) -> int:
        return self.pending.count

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_generated_tokens(self) -> int:
        """Output tokens including the pending ones."""
        return len(self.token_ids) + self.num_pending_tokens - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) + self.num_pending_tokens - self.num_computed_tokens

    @property
    def min_chunk(self) -> int:
        """The fewest tokens its next step may compute: the rest of a prefix-LM prompt's
        bidirectional context (whose K/V depend on all of it), else 1."""
        if self.prefix is None:
            return 1
        return max(1, self.prefix.context_len - self.num_computed_tokens)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
