"""One step as the model runner gets it: the scheduler's decisions as typed, torch-free data.

The engine core turns the scheduler's choice of sequences into a `SchedulerOutput`: for each
scheduled sequence a `ScheduledSeq` row saying which tokens to compute at which positions, the
block ids appended to its block table since the runner last saw it, whether the row samples and,
if so, how. The runner decides nothing from it; it flattens the rows into tensors
(worker/input_batch.py) and runs them. Rank 0 of a tensor-parallel group pickles the same
dataclasses to the other ranks; a row's pickle leaves out its sampling details, which only rank 0
uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flatout.config import ModelConfig
from flatout.sampling_params import SamplingParams


@dataclass
class MultiModalItem:
    """One image of a prompt: where its placeholder tokens are, its patch grid, its pixels.

    The prompt's tokens [offset, offset + num_tokens) are the image's `<|image|>` placeholders;
    the encoder's output for it has exactly num_tokens rows, which replace their embeddings.
    `pixels` is the decoded image, [H, W, 3] uint8 (a numpy array: one pickle, no floats);
    the engine core resizes it to `resized` (height, width) and patchifies it on its device.
    `content_hash` names the image's content and preprocessing (equal hashes: equal encoder
    outputs); the encoder cache and the prefix cache's block hashes key on it."""

    offset: int
    num_tokens: int
    grid_thw: tuple[int, int, int]
    resized: tuple[int, int]
    content_hash: bytes
    pixels: Any  # numpy.ndarray [H, W, 3] uint8

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


@dataclass
class SamplingInfo:
    """How rank 0 samples a row's next token (never sent to the other ranks)."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # known outputs; a pending one is added on the device
    # ids masked out this step: the stop and EOS ids while the output is under min_tokens
    # (the engine core's stop rules decide; the runner only applies the ban)
    banned_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # the row's own generator's seed (params.seed + output index)

    @property
    def num_logprobs(self) -> int | None:
        return self.params.logprobs


@dataclass(frozen=True)
class PrefixLayout:
    """Where a prefix-LM prompt (ChatGLM-6B v1) marks itself, as the checkpoint's code reads it.

    Tokens before `context_len` (the first <sop>) attend to each other bidirectionally; <sop>
    and everything after it attend causally. 2-D positions of token t: (t, 0) before
    context_len, else (mask_position, t - context_len + 1), mask_position being the index of the
    prompt's first [gMASK] (or, without one, its first [MASK])."""

    context_len: int
    mask_position: int

    @classmethod
    def of(cls, prompt_token_ids: list[int], sop_token_id: int,
           mask_token_ids: tuple[int, ...]) -> PrefixLayout:
        """The layout of a prompt; ValueError naming what the prompt lacks."""
        if sop_token_id not in prompt_token_ids:
            raise ValueError(
                f"prompt lacks the <sop> token (id {sop_token_id}) that ends the bidirectional "
                f"context of this prefix-LM model (ChatGLM-6B prompts end with [gMASK] <sop>)"
            )
        mask = next((m for m in mask_token_ids if m in prompt_token_ids), None)
        if mask is None:
            raise ValueError(
                f"prompt lacks a mask token (ids {list(mask_token_ids)}: [gMASK] or [MASK]) that "
                f"places the generated span of this prefix-LM model"
            )
        return cls(prompt_token_ids.index(sop_token_id), prompt_token_ids.index(mask))

    def positions(self, start: int, end: int) -> list[int]:
        """The 2-D positions of tokens [start, end), flat: (position, block position) pairs."""
        out: list[int] = []
        c = self.context_len
        for t in range(start, end):
            out.extend((t, 0) if t < c else (self.mask_position, t - c + 1))
        return out


def prompt_layout(model: ModelConfig, prompt_token_ids: list[int]) -> PrefixLayout | None:
    """The prompt's PrefixLayout under a prefix-LM model (ValueError when it lacks its marks);
    None for every other model."""
    if not model.prefix_lm:
        return None
    if model.bos_token_id is None:
        raise ValueError(f"{model.model}: a prefix-LM config needs bos_token_id (<sop>)")
    return PrefixLayout.of(prompt_token_ids, model.bos_token_id, model.mask_token_ids)


@dataclass
class ImageSlice:
    """Rows [first, last) of an image's encoder output replace the embeddings of the row's
    tokens from `at` on (an index among the row's tokens this step)."""

    content_hash: bytes
    first: int
    last: int
    at: int


@dataclass
class ScheduledSeq:
    """One sequence in one step: compute positions [start, start + num_tokens)."""

    seq_id: int
    start: int  # position of the first token computed this step (tokens before are cached)
    token_ids: list[int]  # the input ids of this step that the host knows
    # the row's last input is the token the previous step sampled and the host has not read
    # back yet (overlap scheduling): it sits at this row of that step's sampled tokens, on the
    # device; None: every input id is in token_ids
    pending_row: int | None
    # the sequence's block table starts afresh (first step, or first after a preemption) and is
    # new_block_ids; otherwise new_block_ids extend the table the runner holds
    is_new: bool
    new_block_ids: list[int]
    sample: bool  # all its tokens are computed after this step: its next token is sampled
    sampling: SamplingInfo | None = None  # rank 0, rows that sample; never pickled
    prefix: PrefixLayout | None = None  # prefix-LM models: the prompt's layout
    # M-RoPE (a request with images): the (t, h, w) positions of this step's tokens while
    # they are prompt tokens (None: every token at position + rope_delta on all three axes)
    mrope_positions: tuple[list[int], list[int], list[int]] | None = None
    rope_delta: int = 0
    image_slices: list[ImageSlice] = field(default_factory=list)  # in token order
    # 1-D positions of this step's tokens while they are prompt tokens whose positions are not
    # their indices (GLM-4V-9B's images); None: token i at position i + rope_delta
    positions: list[int] | None = None

    def __reduce__(self) -> tuple[type[ScheduledSeq], tuple[object, ...]]:
        """Pickled (to the other tensor-parallel ranks) as its values without `sampling`,
        which only rank 0 reads: a few bytes per row."""
        return ScheduledSeq, (self.seq_id, self.start, self.token_ids, self.pending_row,
                              self.is_new, self.new_block_ids, self.sample, None, self.prefix,
                              self.mrope_positions, self.rope_delta, self.image_slices,
                              self.positions)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + (self.pending_row is not None)

    @property
    def end(self) -> int:
        """The context length after this step (tokens with K/V in the cache)."""
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    """Everything the runner needs for one step."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    # sequences finished since the last step: the runner forgets their tables and generators
    finished_seq_ids: list[int] = field(default_factory=list)
    # images to encode this step (their outputs join the runner's encoder cache before the
    # forward reads them) and encoder outputs no sequence needs any more (dropped first)
    encoder_inputs: list[MultiModalItem] = field(default_factory=list)
    freed_encoder_hashes: list[bytes] = field(default_factory=list)

    @property
    def num_new_tokens(self) -> list[int]:
        return [s.num_tokens for s in self.seqs]

    @property
    def sampled(self) -> list[ScheduledSeq]:
        return [s for s in self.seqs if s.sample]


class BlockTableSync:
    """The engine side's record of how much of each sequence's block table the runner holds,
    so that each step sends only the blocks appended since."""

    def __init__(self) -> None:
        self.num_sent: dict[int, int] = {}  # seq id -> length of the table the runner holds
        self.finished: list[int] = []

    def delta(self, seq_id: int, table: list[int]) -> tuple[bool, list[int]]:
        """(is_new, new block ids) for a sequence scheduled with block table `table`."""
        sent = self.num_sent.get(seq_id)
        self.num_sent[seq_id] = len(table)
        if sent is None:
            return True, list(table)
        return False, table[sent:]

    def reset(self, seq_id: int) -> None:
        """Its blocks were freed (preempted): the next table it gets is a new one."""
        self.num_sent.pop(seq_id, None)

    def finish(self, seq_id: int) -> None:
        self.num_sent.pop(seq_id, None)
        self.finished.append(seq_id)

    def take_finished(self) -> list[int]:
        finished, self.finished = self.finished, []
        return finished
