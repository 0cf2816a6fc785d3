"""Tensor-parallel state and the collectives that parallel layers call.

Until tensor parallelism is initialised every process is rank 0 of a group of 1 and the
collectives are identities, so single-GPU and CPU runs never touch torch.distributed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class _TensorParallelState:
    rank: int = 0
    size: int = 1


_state = _TensorParallelState()


def init_tensor_parallel(rank: int, size: int) -> None:
    """Record this process's place in the tensor-parallel group (the default process group).

    Called once per worker process, after torch.distributed is initialised and before the model
    is built: layers read the rank and size when they are constructed."""
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"invalid tensor-parallel rank {rank} of size {size}")
    _state.rank, _state.size = rank, size


def get_tp_rank() -> int:
    return _state.rank


def get_tp_size() -> int:
    return _state.size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group (in place); identity for a group of 1."""
    if _state.size == 1:
        return x
    dist.all_reduce(x)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` in rank order; identity for a group of 1."""
    if _state.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)
