"""Tensor-parallel state, process-group setup, and the collectives that parallel layers call.

Until tensor parallelism is initialised every process is rank 0 of a group of 1 and the
collectives are identities, so single-GPU and CPU runs never touch torch.distributed. With
tensor parallelism every rank joins one default process group (NCCL on GPUs, gloo on CPU) through
torch.distributed's env:// style rendezvous (MASTER_ADDR / MASTER_PORT, RANK, WORLD_SIZE), plus a
gloo group for the driver's small control messages (see control.py).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from flatout.worker.symm_reduce import SymmetricReduce


@dataclass
class _TensorParallelState:
    rank: int = 0
    size: int = 1
    control_group: object | None = None
    symmetric: SymmetricReduce | None = None  # the fused all-reduce's buffers, where enabled


_state = _TensorParallelState()
# control messages wait while the server idles: far beyond gloo's default 30 minutes
CONTROL_TIMEOUT = datetime.timedelta(days=365)
INIT_TIMEOUT = datetime.timedelta(minutes=10)


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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(
    rank: int, world_size: int, backend: str, master_addr: str, master_port: int
) -> None:
    """Join the tensor-parallel process group (all ranks call this) and set up TP state."""
    dist.init_process_group(
        backend,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world_size,
        timeout=INIT_TIMEOUT,
    )
    init_tensor_parallel(rank, world_size)
    # a gloo group of its own, even on CPU: its long timeout lets workers wait out idle time
    _state.control_group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)


def control_group() -> object:
    assert _state.control_group is not None, "tensor parallelism is not initialised"
    return _state.control_group


def destroy_distributed() -> None:
    """Leave the process group and become a group of one again (idempotent)."""
    _state.symmetric = None  # its buffers go with their tensors
    if dist.is_initialized() and dist.get_backend() != "nccl":
        dist.destroy_process_group()
    # NCCL's teardown waits on peers that have usually exited by now and can hang; the group
    # is left to end with the process (so one process hosts one NCCL group in its lifetime)
    _state.rank, _state.size, _state.control_group = 0, 1, None


def env_rendezvous() -> tuple[str, int | None]:
    """MASTER_ADDR and MASTER_PORT from the environment (torchrun's names)."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT")
    return addr, int(port) if port else None


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group (in place); identity for a group of 1."""
    if _state.size == 1:
        return x
    dist.all_reduce(x)
    return x


def init_symmetric_reduce(max_rows: int, hidden: int, dtype: torch.dtype,
                          device: torch.device, local_world: int) -> bool:
    """Set up the all-reduce fused with add + RMSNorm (symm_reduce.py) if every rank can; all
    ranks call this and agree. Returns whether it is on."""
    from flatout.worker import symm_reduce

    if _state.size == 1:
        return False
    ok = local_world == _state.size and symm_reduce.peers_reachable(device, local_world)
    if not min_over_ranks(int(ok), device):
        return False
    _state.symmetric = symm_reduce.SymmetricReduce(min(max_rows, symm_reduce.MAX_ROWS), hidden,
                                                   dtype, device)  # fmt: skip
    return True


def partial_buffer(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Where a row-parallel linear writes a partial sum that the next norm reduces (None: any
    tensor, reduced over NCCL)."""
    sym = _state.symmetric
    return None if sym is None else sym.partial_buffer(rows, cols, dtype)


def all_reduce_add_rms_norm(
    partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The fused all-reduce + add + RMSNorm of a partial from `partial_buffer`, or None when
    the caller must all-reduce and normalise itself."""
    sym = _state.symmetric
    return None if sym is None else sym.add_rms_norm(partial, residual, weight, eps)


def broadcast_from_driver(x: torch.Tensor) -> torch.Tensor:
    """Rank 0's `x` on every rank (in place); identity for a group of 1."""
    if _state.size == 1:
        return x
    dist.broadcast(x, src=0)
    return x


def all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` in rank order; identity for a group of 1."""
    if _state.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_state.size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=dim)


def min_over_ranks(value: int, device: torch.device) -> int:
    """The smallest `value` any rank holds (every rank calls it); `value` for a group of 1."""
    if _state.size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())
