"""The driver's per-step control messages to the other tensor-parallel ranks.

Rank 0 schedules and samples; every rank runs the same forward. Before each forward rank 0
broadcasts what the other ranks cannot know: for each scheduled sequence its id, first position,
the token ids computed this step (a decode: the one new token, or only the row of last step's
sampled tokens that holds it, when rank 0 has not read it back yet) and the blocks appended to its
block table since it was last sent (the whole table the first time and after a preemption),
plus the ids of sequences that finished. Workers keep the block tables; no tensor ever travels
here, only these few bytes, over a gloo group of their own. Activations move only through the
layers' own collectives (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from flatout.distributed import control_group

# one broadcast carries a message up to this size; larger ones (long prefills) take a second
_BUFFER = 1 << 14
_HEADER = struct.Struct("<q")


@dataclass
class SeqWork:
    """One scheduled sequence as the forward sees it (on every rank)."""

    seq_id: int
    start: int  # position of the first token computed this step
    token_ids: list[int]  # the tokens computed this step whose ids the host knows
    block_table: list[int]
    sample: bool  # all its tokens are computed after this step: rank 0 samples its next token
    # >= 0: one more token follows token_ids, the one sampled last step in this row of its
    # sampled tokens (still on the device); -1: none
    pending_row: int = -1

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids) + (self.pending_row >= 0)


@dataclass
class StepMessage:
    # (seq_id, start, token_ids, appended blocks, blocks are the whole table, sample, pending row)
    seqs: list[tuple[int, int, list[int], list[int], bool, bool, int]] = field(
        default_factory=list
    )
    finished: list[int] = field(default_factory=list)
    stop: bool = False


class ControlChannel:
    """Broadcast of small pickled messages from rank 0 over the control group."""

    def __init__(self) -> None:
        self.group = control_group()
        self.buf = torch.zeros(_BUFFER, dtype=torch.uint8)

    def send(self, msg: StepMessage) -> int:
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        n = len(data)
        head = _HEADER.pack(n) + data[: _BUFFER - _HEADER.size]
        self.buf[: len(head)] = torch.frombuffer(bytearray(head), dtype=torch.uint8)
        dist.broadcast(self.buf, src=0, group=self.group)
        rest = data[_BUFFER - _HEADER.size :]
        if rest:
            dist.broadcast(torch.frombuffer(bytearray(rest), dtype=torch.uint8), 0, self.group)
        return n

    def recv(self) -> StepMessage:
        dist.broadcast(self.buf, src=0, group=self.group)
        raw = self.buf.numpy().tobytes()
        (n,) = _HEADER.unpack_from(raw)
        data = raw[_HEADER.size : _HEADER.size + n]
        missing = n - len(data)
        if missing > 0:
            rest = torch.empty(missing, dtype=torch.uint8)
            dist.broadcast(rest, src=0, group=self.group)
            data += rest.numpy().tobytes()
        return pickle.loads(data)


class DriverState:
    """Rank 0's record of what the workers know, to send only what changed."""

    def __init__(self) -> None:
        self.known_blocks: dict[int, int] = {}  # seq id -> length of the table workers hold
        self.finished: list[int] = []

    def message(self, work: list[SeqWork], preempted_ids: list[int]) -> StepMessage:
        for sid in preempted_ids:  # their blocks were freed: the next table is a new one
            if self.known_blocks.pop(sid, None) is not None:
                self.finished.append(sid)
        msg = StepMessage(finished=self.finished)
        self.finished = []
        for w in work:
            known = self.known_blocks.get(w.seq_id)
            reset = known is None
            blocks = w.block_table if reset else w.block_table[known:]
            self.known_blocks[w.seq_id] = len(w.block_table)
            msg.seqs.append(
                (w.seq_id, w.start, w.token_ids, blocks, reset, w.sample, w.pending_row)
            )
        return msg

    def release(self, seq_id: int) -> None:
        if self.known_blocks.pop(seq_id, None) is not None:
            self.finished.append(seq_id)


class WorkerState:
    """A worker's mirror of the block tables; turns a message back into the step's work."""

    def __init__(self) -> None:
        self.tables: dict[int, list[int]] = {}

    def apply(self, msg: StepMessage) -> list[SeqWork]:
        for sid in msg.finished:
            self.tables.pop(sid, None)
        work = []
        for sid, start, tokens, blocks, reset, sample, pending_row in msg.seqs:
            if reset:
                table = self.tables[sid] = list(blocks)
            else:
                table = self.tables[sid]
                table.extend(blocks)
            work.append(SeqWork(sid, start, tokens, table, sample, pending_row))
        return work
