"""INT8 weight-only (W8A16) decode GEMV against bf16 on GLM-4-9B shapes, on the GPU.

For each linear of a GLM-4-9B layer and the LM head, at 1 and 32 rows: cuBLAS on bf16 weights,
flatout's bf16 GEMV, and the int8 GEMV (flatout/kernels/gemv.py, scales applied in the epilogue)
over a few tile shapes (best kept), each as one CUDA graph over weight copies larger than L2.

    python benchmarks/bench_int8_gemv.py > benchmarks/results/int8_gemv_h200.md
"""

from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F
from tune_gemv import COPY_BW, SHAPES, time_graph

from flatout.kernels import reference
from flatout.kernels.gemv import GemvConfig, gemv

CANDIDATES = [
    GemvConfig(bn, bk, w, s)
    for bn, bk, w, s in itertools.product((32, 64, 128), (256, 512), (4, 8), (3, 4))
]


def main() -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    print(f"# INT8 (W8A16) decode GEMV vs bf16 on {torch.cuda.get_device_name()}\n")
    print("`python benchmarks/bench_int8_gemv.py` — weights from HBM (copies > L2), one CUDA graph")
    print("per measurement; % is the int8 GEMV's weight bytes / time over 4.10 TB/s.\n")
    print("| linear | rows | bf16 cuBLAS µs | bf16 gemv µs | int8 gemv µs | int8 / cuBLAS | "
          "int8 % | tile | rel err vs dequantized |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (n, k, has_bias) in SHAPES.items():
        copies = max(1, -(-512 * 2**20 // (n * k)))  # int8 bytes > 512 MiB
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        qs = [reference.quantize_int8(w) for w in ws]
        b = torch.randn(n, device=dev, dtype=torch.bfloat16) if has_bias else None
        for m in (1, 32):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            q0, s0 = qs[0]
            ref = reference.linear_w8a16(x.float(), q0, s0, None if b is None else b.float())
            rel = ((gemv(x, q0, b, scale=s0).float() - ref).norm() / ref.norm()).item()
            if rel > 1e-2:
                sys.exit(f"{name} m={m}: int8 gemv differs (rel {rel:.2e})")

            def cublas(x=x, b=b, ws=ws):
                for w in ws:
                    F.linear(x, w, b)

            def bf16(x=x, b=b, ws=ws):
                for w in ws:
                    gemv(x, w, b)

            t_cublas = time_graph(cublas) / copies
            t_bf16 = time_graph(bf16) / copies
            best = None
            for cfg in CANDIDATES:
                def int8(x=x, b=b, cfg=cfg, qs=qs):
                    for q, s in qs:
                        gemv(x, q, b, config=cfg, scale=s)

                try:
                    t = time_graph(int8) / copies
                except Exception:  # a tile that does not fit shared memory
                    continue
                if best is None or t < best[0]:
                    best = (t, cfg)
            assert best is not None
            t8, cfg = best
            print(f"| {name} | {m} | {t_cublas * 1e6:.1f} | {t_bf16 * 1e6:.1f} | {t8 * 1e6:.1f} | "
                  f"{t8 / t_cublas:.2f} | {n * k / t8 / COPY_BW:.0%} | {cfg.block_n}, "
                  f"{cfg.block_k}, {cfg.num_warps}, {cfg.num_stages} | {rel:.1e} |")
        del ws, qs
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
