"""Sweep the paged decode attention kernel's launch settings at GLM-4-9B's shapes (per rank at
tensor parallel 1 and 2), each timed as a replayed CUDA graph, as the engine runs it.

    python benchmarks/tune_decode_attention.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
from triton.testing import do_bench_cudagraph

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatout.kernels.decode_attention import decode_num_splits, paged_decode_attention  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--family", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.family is None:  # each (block_n, warps) in a process of its own: a crash stays there
        import subprocess

        for block_n, warps in itertools.product([32, 64, 128], [4, 8]):
            subprocess.run([sys.executable, __file__, "--out", a.out, "--family",
                            f"{block_n},{warps}"], timeout=120, check=False)
        rows = []
        for f in sorted(Path(a.out).glob("tune_[0-9]*_*.json")):
            rows += json.loads(f.read_text())
        summarize(rows, Path(a.out))
        return
    fam_block_n, fam_warps = map(int, a.family.split(","))
    dev = torch.device("cuda")
    bs_, D, ctx, width = 16, 128, 530, 512  # block size, head dim, context, table width (8k)
    rows = []
    for (heads, kv), batch in itertools.product([(32, 2), (16, 1)], [1, 8, 32, 128, 256]):
        nblocks = batch * width + 1
        k = torch.randn(nblocks, bs_, kv, D, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        q = torch.randn(batch, heads, D, dtype=torch.bfloat16, device=dev)
        tables = torch.arange(batch * width, dtype=torch.int32, device=dev).view(batch, width)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        out = torch.empty_like(q)
        default = decode_num_splits(batch, kv, width, bs_, dev)
        kv_bytes = batch * ctx * kv * D * 2 * 2
        tensors = (q, k, v, tables, lens)
        # do_bench_cudagraph runs on a stream of its own that does not wait for the default one:
        # unsynchronised, the kernel could read a block table not yet written (an illegal address)
        torch.cuda.synchronize()
        for splits, block_n, warps, stages in itertools.product(
            sorted({1, 2, 4, 8, 16, 32, default}), [fam_block_n], [fam_warps], [2]
        ):
            def fn(t=tensors, o=out, splits=splits, block_n=block_n, warps=warps,  # noqa: ANN001
                   stages=stages) -> None:
                paged_decode_attention(*t, 0.088, out=o, num_splits=splits, block_n=block_n,
                                       num_warps=warps, num_stages=stages)
            try:
                us = do_bench_cudagraph(fn, rep=20) * 1e3
            except Exception as e:  # noqa: BLE001 - a setting may not compile
                print("skip", heads, kv, batch, splits, block_n, warps, stages, type(e).__name__)
                continue
            rows.append({"heads": heads, "kv": kv, "batch": batch, "splits": splits,
                         "block_n": block_n, "warps": warps, "stages": stages, "us": us,
                         "default": (splits, block_n, warps, stages) == (default, 64, 4, 2),
                         "TBps": kv_bytes / us / 1e6})
    (Path(a.out) / f"tune_{fam_block_n}_{fam_warps}.json").write_text(json.dumps(rows))


def summarize(rows: list[dict], out: Path) -> None:
    (out / "tune_decode_attention.json").write_text(json.dumps(rows, indent=1))
    rows.sort(key=lambda r: (r["heads"], r["kv"], r["batch"]))
    for (heads, kv, batch), grp in itertools.groupby(rows, lambda r: (r["heads"], r["kv"],
                                                                      r["batch"])):
        grp = list(grp)
        best = min(grp, key=lambda r: r["us"])
        cur = next((r for r in grp if r["default"]), None)
        print(f"H{heads}/KV{kv} batch {batch}: current {cur and round(cur['us'], 1)} us; best "
              f"{best['us']:.1f} us ({best['TBps']:.2f} TB/s) splits {best['splits']} "
              f"block_n {best['block_n']} warps {best['warps']} stages {best['stages']}")


if __name__ == "__main__":
    main()
