"""The collectives that parallel layers and the runner call over the tensor-parallel group.

Each one is the identity (or the value itself) for a group of one."""

from __future__ import annotations

import torch
import torch.distributed as dist

from flatout.distributed.parallel_state import get_tp_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group (in place); identity for a group of 1."""
    if get_tp_size() == 1:
        return x
    dist.all_reduce(x)
    return x


def broadcast_from_driver(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's `x` on every rank (in place); identity for a group of 1."""
    if get_tp_size() == 1:
        return x
    dist.broadcast(x, src=0)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` in rank order; identity for a group of 1."""
    size = get_tp_size()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` any rank holds (every rank calls it); `value` for a group of 1."""
    if get_tp_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
