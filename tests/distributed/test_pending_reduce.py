"""The tensor-parallel bottom layer on one CPU process: a group of one, where every collective is
the identity, and the reduce that a row-parallel linear leaves to the next norm."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from flatout import distributed
from flatout.distributed import PendingReduce
from flatout.kernels import reference
from flatout.layers.linear import RowParallelLinear
from flatout.layers.norm import RMSNorm


def test_a_group_of_one_needs_no_torch_distributed() -> None:
    assert (distributed.get_tp_rank(), distributed.get_tp_size()) == (0, 1)
    x = torch.randn(3, 4)
    assert distributed.all_reduce(x) is x and distributed.broadcast_from_driver(x) is x
    assert distributed.all_gather(x) is x
    assert distributed.min_over_ranks(7, torch.device("cpu")) == 7
    assert distributed.symmetric_reduce() is None
    assert not distributed.init_symmetric_reduce(8, 4, torch.float32, torch.device("cpu"), 1)
    with pytest.raises(ValueError, match="rank 2 of size 2"):
        distributed.init_tensor_parallel(2, 2)


def test_row_parallel_linear_returns_a_pending_reduce_only_when_asked() -> None:
    x = torch.randn(5, 12)
    reducing = RowParallelLinear(12, 6)
    deferring = RowParallelLinear(12, 6, reduce_results=False)
    reducing.weight.data = deferring.weight.data = torch.randn(6, 12)
    out = reducing(x)
    pending = deferring(x)
    assert isinstance(out, torch.Tensor) and isinstance(pending, PendingReduce)
    assert pending.symmetric is None  # no symmetric buffers on the CPU
    torch.testing.assert_close(pending.finish(), out)


def test_norm_finishes_a_pending_reduce_then_adds_and_normalises() -> None:
    norm = RMSNorm(6, 1e-6)
    norm.weight.data = torch.randn(6)
    x, residual = torch.randn(4, 6), torch.randn(4, 6)
    got = norm.forward_with_residual(PendingReduce(x.clone()), residual)
    want = reference.fused_add_rms_norm(x, residual, norm.weight, 1e-6)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_layers_import_nothing_from_the_worker() -> None:
    code = ("import sys, flatout.layers.linear, flatout.layers.norm, flatout.layers.embedding, "
            "flatout.layers.attention, flatout.layers.rotary, flatout.layers.activation, "
            "flatout.models.decoder\n"
            "bad = sorted(m for m in sys.modules if m.startswith('flatout.worker') or "
            "m == 'triton' or m.startswith('flatout.distributed.symm_reduce'))\n"
            "assert not bad, bad")  # fmt: skip
    subprocess.run([sys.executable, "-c", code], check=True)
