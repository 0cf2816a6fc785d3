"""The all-reduce that a row-parallel linear leaves to the next norm.

A row-parallel linear built with `reduce_results=False` returns a `PendingReduce`: this rank's
partial sum of the layer's output, not yet summed over the group. The next RMSNorm either runs
the one-shot all-reduce + residual add + RMSNorm kernel on it (when the partial was written into
a symmetric-memory buffer, see symm_reduce.py) or finishes the all-reduce over NCCL / gloo and
then adds and normalises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from flatout.distributed.collectives import all_reduce, min_over_ranks
from flatout.distributed.parallel_state import get_tp_size, set_symmetric_reduce, symmetric_reduce

if TYPE_CHECKING:
    from flatout.distributed.symm_reduce import SymmetricPartial


@dataclass(frozen=True)
class PendingReduce:
    """This rank's partial sum [rows, hidden] of a row-parallel linear's output."""

    partial: torch.Tensor
    # the symmetric buffer `partial` was written into; None: an ordinary tensor, reduced by
    # `finish` (NCCL or gloo)
    symmetric: SymmetricPartial | None = None

    def finish(self) -> torch.Tensor:
        """The all-reduced output (in place in `partial`)."""
        return all_reduce(self.partial)


def symmetric_partial(rows: int, cols: int, dtype: torch.dtype) -> SymmetricPartial | None:
    """Where a row-parallel linear writes a [rows, cols] partial sum for the one-shot fused
    reduce, or None when the group has no symmetric buffers or they do not fit it."""
    sym = symmetric_reduce()
    return None if sym is None else sym.next_partial(rows, cols, dtype)


def init_symmetric_reduce(max_rows: int, hidden: int, dtype: torch.dtype,
                          device: torch.device, local_world: int) -> bool:
    """Set up the all-reduce fused with add + RMSNorm (symm_reduce.py) if every rank can; all
    ranks call this and agree. Returns whether it is on."""
    if get_tp_size() == 1:
        return False
    from flatout.distributed import symm_reduce  # imports triton: only with a TP group on GPUs

    ok = local_world == get_tp_size() and symm_reduce.peers_reachable(device, local_world)
    if not min_over_ranks(int(ok), device):
        return False
    set_symmetric_reduce(symm_reduce.SymmetricReduce(min(max_rows, symm_reduce.MAX_ROWS), hidden,
                                                     dtype, device))  # fmt: skip
    return True
