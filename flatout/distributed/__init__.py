"""Tensor parallelism's bottom layer: group state, collectives, and the reduce a row-parallel
linear leaves pending for the next norm. Importing this package needs neither triton nor an
initialised torch.distributed; the symmetric-memory reduce (symm_reduce.py, which runs a Triton
kernel) is imported only when a GPU group turns it on."""

from flatout.distributed.collectives import (
    all_gather,
    all_reduce,
    broadcast_from_driver,
    min_over_ranks,
)
from flatout.distributed.parallel_state import (
    control_group,
    destroy_distributed,
    env_rendezvous,
    free_port,
    get_tp_rank,
    get_tp_size,
    init_distributed,
    init_tensor_parallel,
    symmetric_reduce,
)
from flatout.distributed.pending_reduce import (
    PendingReduce,
    init_symmetric_reduce,
    symmetric_partial,
)

__all__ = [
    "PendingReduce",
    "all_gather",
    "all_reduce",
    "broadcast_from_driver",
    "control_group",
    "destroy_distributed",
    "env_rendezvous",
    "free_port",
    "get_tp_rank",
    "get_tp_size",
    "init_distributed",
    "init_symmetric_reduce",
    "init_tensor_parallel",
    "min_over_ranks",
    "symmetric_partial",
    "symmetric_reduce",
]
