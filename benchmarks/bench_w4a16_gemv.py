"""W4A16 (4-bit weights, groups of 128) decode GEMV against bf16 and int8 on GLM-4-9B shapes.

For each linear of a GLM-4-9B layer, at 1, 32, 128 and 256 rows: cuBLAS on bf16 weights, the
int8 GEMV (its tuned tiles) and the 4-bit GEMV (flatout/kernels/w4a16.py, symmetric and with
zero points) over a few tile shapes (best kept), each as one CUDA graph over weight copies
larger than L2; at 4096 rows (prefill) the 4-bit path's dequantize + cuBLAS against bf16 cuBLAS.

    python benchmarks/bench_w4a16_gemv.py > benchmarks/results/w4a16_gemv_h200.md
"""

from __future__ import annotations

import itertools
import sys

import torch
import torch.nn.functional as F
from tune_gemv import COPY_BW, SHAPES, time_graph

from flatout.kernels import reference
from flatout.kernels.gemv import GemvConfig, gemv
from flatout.kernels.w4a16 import gemv_w4a16, linear_w4a16

CANDIDATES = [
    GemvConfig(bn, bk, w, s, block_m=bm)
    for bn, bk, w, s, bm in itertools.product((32, 64, 128), (128, 256), (4,), (3, 4), (0,))
]
GROUP = 128


def timed_w4(x, b, cfg, packed) -> float:  # noqa: ANN001
    def run() -> None:
        for p, s, z in packed:
            gemv_w4a16(x, p, s, z, b, config=cfg)

    try:
        return time_graph(run)
    except Exception:  # a tile that does not fit shared memory
        return float("inf")


def main() -> None:
    torch.manual_seed(0)
    dev = torch.device("cuda")
    print(f"# W4A16 decode GEMV vs bf16 and int8 on {torch.cuda.get_device_name()}\n")
    print("`python benchmarks/bench_w4a16_gemv.py` — weights from HBM (copies > L2), one CUDA "
          "graph per measurement; % is the 4-bit GEMV's bytes (weights + scales) / time over "
          "4.10 TB/s. Groups of 128 inputs; asym: with zero points.\n")
    print("| linear | rows | bf16 cuBLAS µs | int8 gemv µs | w4 sym µs | w4 asym µs | "
          "w4 / bf16 | w4 % | best tile (sym) | rel err vs reference |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (n, k, has_bias) in SHAPES.items():
        if n > 100_000:  # the LM head stays 16-bit
            continue
        copies = max(1, -(-512 * 2**20 // (n * k // 2)))  # 4-bit bytes > 512 MiB
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        b = torch.randn(n, device=dev, dtype=torch.bfloat16) if has_bias else None
        q8 = [reference.quantize_int8(w) for w in ws]
        w4 = {}
        for asym in (False, True):
            packed = []
            for w in ws:
                q, s, z = reference.quantize_w4(w, GROUP, asym)
                packed.append((reference.pack_int4(q), s, z))
            w4[asym] = packed
        bytes4 = n * k // 2 + n * (k // GROUP) * 4
        for m in (1, 32, 128, 256, 4096):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            p0, s0, z0 = w4[True][0]
            ref = reference.linear_w4a16(x.float(), p0, s0, z0, None if b is None else b.float())
            got = linear_w4a16(x, p0, s0, z0, b)
            rel = ((got.float() - ref).norm() / ref.norm()).item()
            if rel > 1e-2:
                sys.exit(f"{name} m={m}: w4a16 differs (rel {rel:.2e})")

            def cublas(x=x, b=b, ws=ws):
                for w in ws:
                    F.linear(x, w, b)

            def int8(x=x, b=b, q8=q8):
                for q, s in q8:
                    gemv(x, q, b, scale=s)

            t_cublas = time_graph(cublas) / copies
            if m == 4096:
                def deq(x=x, b=b, packed=w4[False]):
                    for p, s, z in packed:
                        linear_w4a16(x, p, s, z, b)

                t = time_graph(deq) / copies
                print(f"| {name} | {m} | {t_cublas * 1e6:.1f} | | {t * 1e6:.1f} | | "
                      f"{t / t_cublas:.2f} | | dequantize + cuBLAS | {rel:.1e} |")
                continue
            t_int8 = time_graph(int8) / copies
            best: tuple[float, GemvConfig] | None = None
            for cfg in CANDIDATES:  # symmetric; the zero points then take the same tile
                if m > 64:
                    cfg = GemvConfig(cfg.block_n, cfg.block_k, cfg.num_warps, cfg.num_stages,
                                     block_m=64 if m == 128 else 128)
                t = timed_w4(x, b, cfg, w4[False]) / copies
                if best is None or t < best[0]:
                    best = (t, cfg)
            assert best is not None
            ts, cfg = best
            ta = timed_w4(x, b, cfg, w4[True]) / copies
            print(f"| {name} | {m} | {t_cublas * 1e6:.1f} | {t_int8 * 1e6:.1f} | {ts * 1e6:.1f} "
                  f"| {ta * 1e6:.1f} | {ts / t_cublas:.2f} | {bytes4 / ts / COPY_BW:.0%} | "
                  f"{cfg.block_n}, {cfg.block_k}, {cfg.num_warps}, {cfg.num_stages}, "
                  f"{cfg.block_m} | {rel:.1e} |", flush=True)
        del ws, q8, w4
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
