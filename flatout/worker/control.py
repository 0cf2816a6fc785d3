"""The driver's per-step control messages to the other tensor-parallel ranks.

Rank 0 schedules and samples; every rank runs the same forward. Before each forward rank 0
broadcasts the step's `SchedulerOutput` (engine/batch.py), whose rows pickle without their
sampling details: for each scheduled sequence its id, first position, the token ids computed this
step (a decode: the one new token, or only the row of last step's sampled tokens that holds it,
when rank 0 has not read it back yet) and the blocks appended to its block table since the last
step (the whole table the first time and after a preemption), plus the ids of sequences that
finished. Every rank keeps the block tables (worker/input_batch.py); no tensor ever travels here,
only these few bytes, over a gloo group of their own. Activations move only through the layers'
own collectives (NCCL on GPUs, gloo on CPU).
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flatout.distributed import control_group
from flatout.engine.batch import SchedulerOutput

# one broadcast carries a message up to this size; larger ones (long prefills) take a second
_BUFFER = 1 << 14
_HEADER = struct.Struct("<q")


@dataclass
class StepMessage:
    batch: SchedulerOutput | None = None  # the step to run (rows pickle without sampling)
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
