"""Tune and time flatout's decode GEMV (flatout/kernels/gemv.py) against cuBLAS on GLM-4-9B shapes.

For each linear of a GLM-4-9B layer (qkv with bias, o, gate_up, down) and the LM head, at 1..16
rows: every candidate tile shape runs as one CUDA graph over enough weight copies to exceed L2
(so every byte comes from HBM), timed against F.linear captured the same way. Prints a markdown
table (time per call, weight read bandwidth, % of 4.10 TB/s copy bandwidth) and the best tile per
shape as a Python dict for gemv.TUNED.

    python benchmarks/tune_gemv.py > benchmarks/results/gemv_h200.md
"""

from __future__ import annotations

import itertools
import statistics
import sys

import torch
import torch.nn.functional as F

from flatout.kernels.gemv import GemvConfig, gemv, padded_rows

COPY_BW = 4.10e12
SHAPES = {  # name: (N, K, bias)
    "qkv": (4608, 4096, True),
    "o_proj": (4096, 4096, False),
    "gate_up": (27392, 4096, False),
    "down": (4096, 13696, False),
    "lm_head": (151552, 4096, False),
}
ROWS = (1, 8, 16, 24, 32, 48, 64)
CANDIDATES = [
    GemvConfig(bn, bk, w, s)
    for bn, bk, w, s in itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (3, 4))
]


def time_graph(fn, reps: int = 7) -> float:
    """Median seconds of one replay of a graph that calls fn() once."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    rows_out = []
    tuned: dict[tuple[int, int, int], GemvConfig] = {}
    for name, (n, k, has_bias) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(1, -(-512 * 2**20 // nbytes))  # >= 512 MiB of weights: far above L2
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        b = torch.randn(n, device=dev, dtype=torch.bfloat16) if has_bias else None
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = F.linear(x, ws[0], b).float()
            got = gemv(x, ws[0], b).float()
            rel = ((got - ref).norm() / ref.norm()).item()
            if rel > 1e-2:
                sys.exit(f"{name} m={m}: gemv differs from F.linear (rel {rel:.2e})")

            def cublas(x=x, b=b, ws=ws):
                for w in ws:
                    F.linear(x, w, b)

            t_cublas = time_graph(cublas) / copies
            best: tuple[float, GemvConfig] | None = None
            for cfg in CANDIDATES:
                def ours(x=x, b=b, cfg=cfg, ws=ws):
                    for w in ws:
                        gemv(x, w, b, config=cfg)

                try:
                    t = time_graph(ours) / copies
                except Exception as exc:  # a tile that does not fit shared memory
                    print(f"<!-- {name} m={m} {cfg}: {type(exc).__name__} -->", file=sys.stderr)
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            assert best is not None
            t_ours, cfg = best
            if m in (1, 32, 64):  # the tile for each padded row count: 16, 32, 64
                tuned[(n, k, padded_rows(m))] = cfg
            rows_out.append((name, n, k, m, t_cublas, t_ours, nbytes, cfg, rel))
        del ws
        torch.cuda.empty_cache()

    print(f"# Decode GEMV vs cuBLAS on {torch.cuda.get_device_name()}\n")
    print("`python benchmarks/tune_gemv.py` — bf16 weights from HBM (copies > L2), one CUDA graph")
    print("per measurement, median of 7 replays; % is of the 4.10 TB/s copy bandwidth.\n")
    print("| linear | N × K | rows | cuBLAS µs | cuBLAS % | gemv µs | gemv % | speedup | "
          "best tile (n, k, warps, stages) | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, n, k, m, tc, to, nbytes, cfg, rel in rows_out:
        print(
            f"| {name} | {n} × {k} | {m} | {tc * 1e6:.1f} | {nbytes / tc / COPY_BW:.0%} | "
            f"{to * 1e6:.1f} | {nbytes / to / COPY_BW:.0%} | {tc / to:.2f} | "
            f"{cfg.block_n}, {cfg.block_k}, {cfg.num_warps}, {cfg.num_stages} | {rel:.1e} |"
        )
    print("\nTuned at 1, 32 and 64 rows (for gemv.TUNED):\n\n```python")
    for (n, k, bm), cfg in tuned.items():
        print(f"    ({n}, {k}, {bm}): GemvConfig({cfg.block_n}, {cfg.block_k}, "
              f"{cfg.num_warps}, {cfg.num_stages}),")
    print("```")


if __name__ == "__main__":
    main()
