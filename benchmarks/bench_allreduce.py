"""Small all-reduces as a decode step does them (81 of [batch, hidden] bf16 for GLM-4-9B),
captured in a CUDA graph: NCCL beside a one-shot all-reduce over PyTorch's symmetric memory
(both with an elementwise kernel between calls, as layers have), checked against NCCL's sums.
Measured on 2 x H200 (benchmarks/results/bench_allreduce_h200x2.json): a plain one-shot with a
copy in is no faster than NCCL at decode sizes; what the engine uses instead is the one-shot fused
with the residual add and RMSNorm, the partials written in place by the GEMM
(flatout/kernels/allreduce.py; measured in benchmarks/bench_tp.py).

    python benchmarks/bench_allreduce.py --out DIR [--gpus 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, CALLS, REPLAYS = 4096, 81, 50


class OneShotAllReduce:
    """Small all-reduces through PyTorch's symmetric memory: each rank copies its tensor into a
    buffer every rank reads over NVLink, and one kernel sums them. Two buffers alternate: a rank
    overwrites one only after every peer started the next all-reduce (done reading it)."""

    def __init__(self, max_numel: int, dtype: torch.dtype, device: torch.device) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.group_name = dist.group.WORLD.group_name  # type: ignore[union-attr]
        self.max_numel = max_numel
        self.buffers = []
        for _ in range(2):
            buf = symm_mem.empty(max_numel, dtype=dtype, device=device)
            symm_mem.rendezvous(buf, self.group_name)
            self.buffers.append(buf)
        self.next = 0

    def __call__(self, x: torch.Tensor) -> bool:
        buf = self.buffers[self.next]
        if x.dtype != buf.dtype or x.numel() > self.max_numel or not x.is_contiguous():
            return False
        self.next ^= 1
        staged = buf[: x.numel()].view_as(x)
        staged.copy_(x)
        torch.ops.symm_mem.one_shot_all_reduce_out(staged, "sum", self.group_name, x)
        return True


def _rank(rank: int, world: int, port: int, out: str) -> None:
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=dev)
    res: dict = {}
    one_shot = None
    try:
        one_shot = OneShotAllReduce(256 * HIDDEN, torch.bfloat16, dev)
    except Exception as e:  # noqa: BLE001
        res["symm_error"] = f"{type(e).__name__}: {e}"[:300]

    def timed(fn) -> float:  # noqa: ANN001 - µs per all-reduce, replayed in a graph
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        g.replay()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(REPLAYS):
            g.replay()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) * 1e3 / REPLAYS / CALLS

    for batch in [1, 8, 32, 128, 256]:
        gen = torch.Generator(device=dev).manual_seed(rank)
        x0 = torch.randn(batch, HIDDEN, dtype=torch.bfloat16, device=dev, generator=gen)
        ref = x0.clone()
        dist.all_reduce(ref)
        x = x0.clone()

        def nccl(x=x) -> None:  # noqa: ANN001 - values grow; only the time matters here
            for _ in range(CALLS):
                dist.all_reduce(x)
                x.mul_(0.5)

        row = {"nccl_us": timed(nccl)}
        if one_shot is not None:
            # correctness through both alternating buffers, inside a graph as well
            checks = []
            for _ in range(3):
                y = x0.clone()
                assert one_shot(y)
                checks.append((y.float() - ref.float()).abs().max().item())
            y = x0.clone()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                one_shot(y)
            y.copy_(x0)
            g.replay()
            torch.cuda.synchronize()
            checks.append((y.float() - ref.float()).abs().max().item())
            row["one_shot_max_err"] = max(checks)
            z = x0.clone()

            def fast(z=z) -> None:  # noqa: ANN001
                for _ in range(CALLS):
                    one_shot(z)
                    z.mul_(0.5)

            row["one_shot_us"] = timed(fast)
        res[batch] = row
    if rank == 0:
        Path(out).write_text(json.dumps(res, indent=1))
    dist.barrier()
    os._exit(0)


def main() -> None:
    from flatout.distributed import free_port

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpus", type=int, default=2)
    a = ap.parse_args()
    Path(a.out).mkdir(parents=True, exist_ok=True)
    f = Path(a.out) / "bench_allreduce.json"
    mp.spawn(_rank, args=(a.gpus, free_port(), str(f)), nprocs=a.gpus)
    print(f.read_text())


if __name__ == "__main__":
    main()
