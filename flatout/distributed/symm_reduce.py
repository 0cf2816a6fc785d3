"""Buffers every rank of one node can read, for the all-reduce fused with add + RMSNorm.

At decode sizes an all-reduce moves a few kilobytes, and what it costs is latency: NCCL's ring
kernel, then the add + norm kernel, then the gaps between them, twice per layer. With
`SymmetricReduce` a row-parallel linear writes its partial output straight into a buffer of
PyTorch symmetric memory (mapped into every rank's address space over NVLink) and hands the next
norm a `PendingReduce` naming that buffer (a `SymmetricPartial`); the norm runs
`flatout.kernels.allreduce.one_shot_add_rms_norm`, which meets the peers, sums their partials,
adds the residual and normalises in one kernel.

Two buffers alternate, in the order the layers ask for them (every rank asks in the same
order). A rank writes into a buffer again only two requests later; in between, the fused call on
the other buffer (or an NCCL collective) waited for every peer to start it, i.e. to have finished
reading this one. Forwards with more rows than the buffers hold (long prefills) use NCCL.

Only for ranks of one node whose GPUs can map each other's memory; off with
`--disable-custom-all-reduce`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from flatout.kernels.allreduce import MAX_PROGRAMS, one_shot_add_rms_norm

log = logging.getLogger(__name__)

MAX_ROWS = 512  # 4 rows per program at most; larger batches are bandwidth-bound: NCCL


@dataclass(frozen=True)
class SymmetricPartial:
    """A [rows, hidden] view of one symmetric buffer, with the peers' addresses of that buffer
    and of its barrier flags: what the one-shot kernel needs to reduce it."""

    partial: torch.Tensor
    buffer_ptrs: torch.Tensor  # int64 [world] on the device
    flag_ptrs: torch.Tensor  # int64 [world] on the device
    rank: int

    def add_rms_norm(
        self, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(all_reduce(partial) + residual), all_reduce(partial) + residual)."""
        return one_shot_add_rms_norm(self.buffer_ptrs, self.flag_ptrs, self.rank, residual,
                                     weight, eps)  # fmt: skip


def peers_reachable(device: torch.device, local_world: int) -> bool:
    """Whether this rank's GPU can map the memory of the node's other ranks' GPUs."""
    if device.type != "cuda":
        return False
    try:
        import torch.distributed._symmetric_memory  # noqa: F401
    except ImportError:
        return False
    me = device.index if device.index is not None else torch.cuda.current_device()
    return all(torch.cuda.can_device_access_peer(me, other)
               for other in range(local_world) if other != me)  # fmt: skip


class SymmetricReduce:
    def __init__(self, max_rows: int, hidden: int, dtype: torch.dtype,
                 device: torch.device) -> None:  # fmt: skip
        import torch.distributed._symmetric_memory as symm_mem

        group = dist.group.WORLD
        assert group is not None, "torch.distributed is not initialised"
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.max_rows, self.hidden, self.dtype = max_rows, hidden, dtype
        self.buffers: list[torch.Tensor] = []
        self._flags: list[torch.Tensor] = []
        self.buffer_ptrs: list[torch.Tensor] = []  # int64 [world] per buffer, on the device
        self.flag_ptrs: list[torch.Tensor] = []
        for _ in range(2):
            buf = symm_mem.empty(max_rows * hidden, dtype=dtype, device=device)
            flags = symm_mem.empty(MAX_PROGRAMS * self.world, dtype=torch.int32, device=device)
            flags.zero_()
            buf_handle = symm_mem.rendezvous(buf, group.group_name)
            flag_handle = symm_mem.rendezvous(flags, group.group_name)
            self.buffers.append(buf)
            self._flags.append(flags)
            self.buffer_ptrs.append(torch.tensor(buf_handle.buffer_ptrs, dtype=torch.int64,
                                                 device=device))  # fmt: skip
            self.flag_ptrs.append(torch.tensor(flag_handle.buffer_ptrs, dtype=torch.int64,
                                               device=device))  # fmt: skip
        torch.cuda.synchronize(device)
        index = device.index if device.index is not None else torch.cuda.current_device()
        dist.barrier(device_ids=[index])  # every rank's flags are zero before any rank signals
        self.next = 0
        log.info("fused all-reduce: 2 x %d rows x %d over symmetric memory (rank %d of %d)",
                 max_rows, hidden, self.rank, self.world)

    def next_partial(self, rows: int, cols: int, dtype: torch.dtype) -> SymmetricPartial | None:
        """The next buffer, where a row-parallel linear writes its [rows, cols] partial output,
        or None when it does not fit (then the caller reduces with NCCL)."""
        if rows > self.max_rows or cols != self.hidden or dtype != self.dtype or rows == 0:
            return None
        i = self.next
        self.next ^= 1
        return SymmetricPartial(self.buffers[i][: rows * cols].view(rows, cols),
                                self.buffer_ptrs[i], self.flag_ptrs[i], self.rank)  # fmt: skip
