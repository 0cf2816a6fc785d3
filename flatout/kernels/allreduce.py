"""One-shot all-reduce fused with the residual add and RMSNorm, for small tensor-parallel steps.

After a row-parallel linear every rank holds a partial sum of the layer's output; the next thing
the decoder does is add the residual and normalise. Over NCCL that is three kernels (the
all-reduce, then the fused add + norm) and NCCL's ring protocol, several microseconds each at
decode sizes. Here one kernel does it all: every rank's partial already sits in a buffer that all
ranks of the node can read (PyTorch symmetric memory, over NVLink), and each program

  1. meets the same program on every peer (a flag per (program, rank) pair in each rank's flag
     array: set to 1 in the peer's array with release semantics, then wait for the peer's flag
     in ours and reset it to 0 with acquire semantics; both ends spin on compare-and-swap, so a
     flag is never set twice before it is consumed);
  2. for each of its rows, sums the ranks' partials in rank order in fp32 (so every rank computes
     the same bits), rounds to the model dtype (what an all-reduce would have returned), adds the
     residual, and normalises with flatout.kernels.norm's `_normalise`.

The caller must not overwrite a rank's buffer until every peer has read it: buffers alternate, and
the barrier of the next call (or any collective in between) proves the peers are past this one
(see flatout.distributed.symm_reduce). Pointers arrive as int64 tensors of addresses, one per rank.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatout.kernels._utils import next_pow2
from flatout.kernels.norm import _normalise

MAX_PROGRAMS = 128  # flags per rank: MAX_PROGRAMS * world; at most one program per SM or so


@triton.jit
def _meet_peers(flag_ptrs, program, RANK: tl.constexpr, WORLD: tl.constexpr):
    for p in tl.static_range(WORLD):
        if p != RANK:  # tell peer p that this rank reached the barrier
            peer_flags = tl.load(flag_ptrs + p).to(tl.pointer_type(tl.int32))
            slot = peer_flags + program * WORLD + RANK
            while tl.atomic_cas(slot, 0, 1, sem="release", scope="sys") != 0:
                pass
    my_flags = tl.load(flag_ptrs + RANK).to(tl.pointer_type(tl.int32))
    for p in tl.static_range(WORLD):
        if p != RANK:  # wait until peer p did the same, and consume its flag
            slot = my_flags + program * WORLD + p
            while tl.atomic_cas(slot, 1, 0, sem="acquire", scope="sys") != 1:
                pass


@triton.jit
def _one_shot_all_reduce_add_rms_norm_kernel(
    buffer_ptrs, flag_ptrs, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    rows, num_programs, hidden, eps,
    RANK: tl.constexpr, WORLD: tl.constexpr, BLOCK: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
):  # fmt: skip
    program = tl.program_id(0)
    _meet_peers(flag_ptrs, program, RANK, WORLD)
    dtype = residual_out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    w = tl.load(weight_ptr + cols, mask=cols < hidden, other=0.0).to(tl.float32)
    for i in tl.static_range(ROWS_PER_PROGRAM):
        row = program + i * num_programs
        mask = (cols < hidden) & (row < rows)
        offs = row.to(tl.int64) * hidden + cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):  # rank order: the same sum on every rank
            part = tl.load(buffer_ptrs + p).to(tl.pointer_type(dtype))
            part = tl.multiple_of(part, 16)  # symmetric buffers are allocation-aligned
            acc += tl.load(part + offs, mask=mask, other=0.0, volatile=True).to(tl.float32)
        x = acc.to(dtype).to(tl.float32)  # the all-reduced partial, as NCCL would return it
        x += tl.load(residual_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(dtype)  # the stored residual, rounded
        tl.store(residual_out_ptr + offs, x, mask=mask)
        tl.store(out_ptr + offs, _normalise(x.to(tl.float32), w, hidden, eps, dtype), mask=mask)


def one_shot_add_rms_norm(
    buffer_ptrs: torch.Tensor,
    flag_ptrs: torch.Tensor,
    rank: int,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rms_norm(sum_r partial_r + residual) and that sum, where partial_r is the [rows, hidden]
    contiguous tensor at address buffer_ptrs[r] (same dtype as residual).

    buffer_ptrs, flag_ptrs: int64 [world] on the kernel's device; flag_ptrs[r] points at rank
    r's int32 flag array of MAX_PROGRAMS * world entries, all zero between calls. Every rank must
    make the same call (same rows) or the barrier waits forever."""
    world = buffer_ptrs.numel()
    if flag_ptrs.numel() != world or not 0 <= rank < world:
        raise ValueError(f"rank {rank} with {world} buffers and {flag_ptrs.numel()} flag arrays")
    hidden = residual.shape[-1]
    r2 = residual.reshape(-1, hidden).contiguous()
    rows = r2.shape[0]
    out = torch.empty_like(r2)
    r_out = torch.empty_like(r2)
    if rows:
        block = next_pow2(hidden)
        grid = min(rows, MAX_PROGRAMS)
        _one_shot_all_reduce_add_rms_norm_kernel[(grid,)](
            buffer_ptrs, flag_ptrs, r2, weight, out, r_out,
            rows, grid, hidden, eps,
            RANK=rank, WORLD=world, BLOCK=block, ROWS_PER_PROGRAM=triton.cdiv(rows, grid),
            num_warps=min(16, max(1, block // 512)),
        )  # fmt: skip
    return out.view(residual.shape), r_out.view(residual.shape)
