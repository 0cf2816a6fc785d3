"""The fused one-shot all-reduce + add + RMSNorm kernel under the Triton interpreter, one process
playing one rank: the peers' partials are ordinary tensors at their addresses and the peers'
barrier flags are set beforehand, as the peers would have. Cross-GPU behaviour (real peers,
CUDA graphs) is tested in tests/gpu/test_tp_gpu.py."""

from __future__ import annotations

import pytest
import torch

from flatout.kernels import reference
from flatout.kernels.allreduce import MAX_PROGRAMS, one_shot_add_rms_norm


def _ptrs(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)


@pytest.mark.parametrize(("world", "rank", "rows", "hidden"),
                         [(2, 0, 1, 64), (2, 1, 5, 96), (4, 2, 130, 80), (4, 3, 300, 32)])
def test_sums_partials_adds_residual_and_normalises(world, rank, rows, hidden):
    gen = torch.Generator().manual_seed(rows)
    parts = [torch.randn(rows, hidden, generator=gen) for _ in range(world)]
    residual = torch.randn(rows, hidden, generator=gen)
    weight = torch.randn(hidden, generator=gen)
    flags = [torch.zeros(MAX_PROGRAMS * world, dtype=torch.int32) for _ in range(world)]
    programs = min(rows, MAX_PROGRAMS)
    for p in range(world):  # every peer already signalled every program of this rank
        if p != rank:
            flags[rank].view(MAX_PROGRAMS, world)[:programs, p] = 1
    out, summed = one_shot_add_rms_norm(_ptrs(parts), _ptrs(flags), rank, residual, weight, 1e-5)

    want_out, want_sum = reference.one_shot_add_rms_norm(parts, residual, weight, 1e-5)
    torch.testing.assert_close(out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(summed, want_sum, atol=1e-6, rtol=1e-6)
    # the same as an all-reduce followed by the fused add + norm
    ref_out, ref_sum = reference.fused_add_rms_norm(sum(parts), residual, weight, 1e-5)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    # this rank consumed its peers' flags and raised its own in each peer's array
    assert int(flags[rank].sum()) == 0
    for p in range(world):
        if p != rank:
            f = flags[p].view(MAX_PROGRAMS, world)
            assert f[:programs, rank].eq(1).all() and int(f.sum()) == programs


def test_rejects_mismatched_pointer_arrays():
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="rank 2"):
        one_shot_add_rms_norm(_ptrs([x, x]), _ptrs([x, x]), 2, x, x[0], 1e-5)
    with pytest.raises(ValueError, match="flag arrays"):
        one_shot_add_rms_norm(_ptrs([x, x]), _ptrs([x]), 0, x, x[0], 1e-5)
