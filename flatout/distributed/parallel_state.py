"""Tensor-parallel group state and process-group setup.

Until tensor parallelism is initialised every process is rank 0 of a group of 1 and the
collectives are identities, so single-GPU and CPU runs never touch torch.distributed. With
tensor parallelism every rank joins one default process group (NCCL on GPUs, gloo on CPU) through
a TCP rendezvous (MASTER_ADDR / MASTER_PORT, RANK, WORLD_SIZE), plus a gloo group for the
driver's small control messages (flatout.worker.control).
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.distributed as dist

if TYPE_CHECKING:
    from flatout.distributed.symm_reduce import SymmetricReduce


@dataclass
class _TensorParallelState:
    rank: int = 0
    size: int = 1
    control_group: dist.ProcessGroup | None = None
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


def symmetric_reduce() -> SymmetricReduce | None:
    """The fused all-reduce's buffers, if `init_symmetric_reduce` turned it on."""
    return _state.symmetric


def set_symmetric_reduce(sym: SymmetricReduce | None) -> None:
    _state.symmetric = sym


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


def control_group() -> dist.ProcessGroup:
    assert _state.control_group is not None, "tensor parallelism is not initialised"
    return _state.control_group


def destroy_distributed() -> None:
    """Leave the process group and become a group of one again (idempotent).

    Every process group goes, NCCL's too, so that the same process can join another group
    later (engines one after another in a notebook or a sweep). Rank 0 calls this only once its
    workers have left their loop, so no collective is in flight on any rank."""
    _state.symmetric = None  # its buffers go with their tensors
    _state.rank, _state.size, _state.control_group = 0, 1, None
    if dist.is_initialized():
        dist.destroy_process_group()  # all groups, the control group and the TCP store with it


def env_rendezvous() -> tuple[str, int | None]:
    """MASTER_ADDR and MASTER_PORT from the environment (torchrun's names)."""
    addr = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = os.environ.get("MASTER_PORT")
    return addr, int(port) if port else None
