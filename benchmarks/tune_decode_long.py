"""Sweep the paged decode attention kernel over batch x context at GLM-4-9B's per-layer shapes
(32 query heads, 2 KV heads, head dim 128, block size 16, bf16), each setting timed as a replayed
CUDA graph: splits per sequence, tile width, warps and pipeline stages. Prints, per shape, the
current default, the best setting and the KV read bandwidth of each, and writes a markdown table.

    python benchmarks/tune_decode_long.py --out DIR
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCHES = [1, 8, 32, 64, 128, 256]
CONTEXTS = [512, 2048, 8192, 32768, 65536]
MAX_TOKENS = 4 * 2**20  # batch x context cap: 4M tokens = 4 GiB of K+V for one layer
SPLITS = [1, 2, 4, 8, 16, 32, 64]
FAMILIES = [(64, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (128, 8, 2)]
HEADS, KV, D, BS = 32, 2, 128, 16
TRACE = bool(os.environ.get("TUNE_TRACE"))


def family(out: Path, block_n: int, warps: int, stages: int) -> None:
    import torch
    from triton.testing import do_bench_cudagraph

    from flatout.kernels.decode_attention import decode_num_splits, paged_decode_attention

    dev = torch.device("cuda")
    rows = []
    for batch, ctx in itertools.product(BATCHES, CONTEXTS):
        if batch * ctx > MAX_TOKENS:
            continue
        width = ctx // BS + 1
        nblocks = batch * width
        k = torch.randn(nblocks, BS, KV, D, dtype=torch.bfloat16, device=dev)
        v = torch.randn_like(k)
        q = torch.randn(batch, HEADS, D, dtype=torch.bfloat16, device=dev)
        perm = torch.randperm(nblocks, device=dev).to(torch.int32)  # pages scattered as in use
        tables = perm.view(batch, width)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=dev)
        o = torch.empty_like(q)
        default = decode_num_splits(batch, KV, width, BS, dev)
        kv_bytes = batch * ctx * KV * D * 2 * 2
        # do_bench_cudagraph launches on a stream of its own, which does not wait for the default
        # stream: without this, the kernel may read a block table randperm has not written yet
        torch.cuda.synchronize()
        for splits in sorted(set(SPLITS) | {default}):
            if splits > 1 and ctx // splits < block_n:
                continue

            def fn(t: tuple = (q, k, v, tables, lens), o: object = o, splits: int = splits,
                   ) -> None:
                paged_decode_attention(*t, 0.088, out=o, num_splits=splits, block_n=block_n,
                                       num_warps=warps, num_stages=stages)

            if TRACE:
                print("run", batch, ctx, splits, block_n, warps, stages, flush=True)
            try:
                us = do_bench_cudagraph(fn, rep=10) * 1e3
            except Exception as e:  # noqa: BLE001 - a setting may not compile or fit
                print("skip", batch, ctx, splits, block_n, warps, stages, type(e).__name__)
                continue
            rows.append({"batch": batch, "ctx": ctx, "splits": splits, "block_n": block_n,
                         "warps": warps, "stages": stages, "us": us,
                         "default": (splits, block_n, warps, stages) == (default, 64, 4, 2),
                         "default_splits": default, "TBps": kv_bytes / us / 1e6})
        del k, v, fn
        torch.cuda.empty_cache()
    (out / f"long_{block_n}_{warps}_{stages}.json").write_text(json.dumps(rows))


def summarize(rows: list[dict], out: Path) -> str:
    lines = ["| batch | ctx | default (splits) | default us | TB/s | best us | TB/s | best setting "
             "(splits, block_n, warps, stages) | best at block_n 64, 4 warps, 2 stages |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows.sort(key=lambda r: (r["batch"], r["ctx"]))
    for (batch, ctx), grp in itertools.groupby(rows, lambda r: (r["batch"], r["ctx"])):
        grp = list(grp)
        best = min(grp, key=lambda r: r["us"])
        cur = next((r for r in grp if r["default"]), None)
        fam = [r for r in grp if (r["block_n"], r["warps"], r["stages"]) == (64, 4, 2)]
        fbest = min(fam, key=lambda r: r["us"]) if fam else None
        if cur:
            lines.append(f"| {batch} | {ctx} | {cur['default_splits']} | {cur['us']:.1f} | "
                         f"{cur['TBps']:.2f} | ")
        else:
            lines.append(f"| {batch} | {ctx} | - | - | - | ")
        lines[-1] += (f"{best['us']:.1f} | {best['TBps']:.2f} | ({best['splits']}, "
                      f"{best['block_n']}, {best['warps']}, {best['stages']}) | ")
        lines[-1] += (f"{fbest['splits']} splits: {fbest['us']:.1f} us |" if fbest else "- |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--family", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.family is not None:
        family(out, *map(int, a.family.split(",")))
        return
    for fam in FAMILIES:  # each family in a process of its own: a crash stays there
        subprocess.run([sys.executable, __file__, "--out", str(out), "--family",
                        ",".join(map(str, fam))], timeout=110, check=False)
    rows: list[dict] = []
    for f in sorted(out.glob("long_*.json")):
        rows += json.loads(f.read_text())
    (out / "tune_decode_long.json").write_text(json.dumps(rows))
    table = summarize(rows, out)
    text = ("# Paged decode attention, batch x context (H200, GLM-4-9B layer: 32 q heads, 2 KV "
            "heads, D 128, block 16, bf16; CUDA-graph replay)\n\n"
            "`python benchmarks/tune_decode_long.py --out DIR`\n\n" + table + "\n")
    (out / "tune_decode_long.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
