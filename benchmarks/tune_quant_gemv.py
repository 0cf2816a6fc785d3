"""Tune and time the quantized linears (int8 W8A16, e4m3 W8A8) on GLM-4-9B's layer shapes.

For 1, 32, 128 and 256 rows of each linear of a GLM-4-9B layer: cuBLAS bf16 (the baseline), the
GEMV/row-blocked kernel of flatout/kernels/gemv.py over a sweep of tiles (int8 weights; e4m3
weights with the products in fp16 or native e4m3 on the tensor cores), int8 dequantized then
cuBLAS, and e4m3 through `torch._scaled_mm` (x quantized per row first). Every candidate is
checked against the fp32 reference before it is timed, as one CUDA graph over enough weight
copies to exceed L2. Prints a markdown table and the best tiles as Python dicts.

    python benchmarks/tune_quant_gemv.py --out benchmarks/results/quant_gemv_h200.md
"""

# ruff: noqa: B023 - every closure below runs inside the iteration that made it
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tune_gemv import time_graph  # noqa: E402  (benchmarks/, the script's own folder)

from flatout.kernels import reference  # noqa: E402
from flatout.kernels.fp8_linear import quantize_fp8_per_token  # noqa: E402
from flatout.kernels.gemv import GemvConfig, gemv  # noqa: E402

SHAPES = {"qkv": (4608, 4096), "o_proj": (4096, 4096), "gate_up": (27392, 4096),
          "down": (4096, 13696)}
ROWS = (1, 32, 128, 256)
SMALL = [GemvConfig(bn, bk, 4, s) for bn, bk, s in itertools.product((32, 64, 128), (256, 512),
                                                                      (3, 4))]
LARGE = [GemvConfig(bn, bk, w, 3, block_m=bm) for bm, bn, bk, w in
         itertools.product((64, 128), (64, 128), (64, 128), (4, 8))]


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop sweeping after this")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    bw = 4.10e12
    t0 = time.time()
    lines = ["# Quantized linears on GLM-4-9B shapes", "",
             f"`python benchmarks/tune_quant_gemv.py --out {args.out}` on "
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}. Time per call in us "
             "(one CUDA graph over weight copies beyond L2); GB/s = weight bytes / time.", "",
             "| shape | rows | bf16 cuBLAS | int8 kernel (best tile) | int8 dequant+cuBLAS | "
             "fp8 kernel fp16 dot | fp8 kernel e4m3 dot | fp8 _scaled_mm |",
             "|---|---|---|---|---|---|---|---|"]
    best: dict[str, dict[tuple[int, int, int], GemvConfig]] = {"int8": {}, "fp8": {}}
    for name, (n, k) in SHAPES.items():
        w16 = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        s8 = (w16.float().abs().amax(1) / 127).clamp_min(1e-12)
        q8 = (w16.float() / s8[:, None]).round().clamp(-127, 127).to(torch.int8)
        sf = (w16.float().abs().amax(1) / 448).clamp_min(1e-12)
        qf = (w16.float() / sf[:, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
        copies = max(1, -(-512 * 2**20 // (n * k)))
        q8s = [q8.clone() for _ in range(copies)]
        qfs = [qf.clone() for _ in range(copies)]
        w16s = [w16.clone() for _ in range(max(1, copies // 2))]
        deq8 = q8.float() * s8[:, None]
        deqf = qf.float() * sf[:, None]
        for m in ROWS:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref8 = x.float() @ deq8.t()
            xq, xs = reference.quantize_fp8_per_token(x)
            reff = (xq.float() * xs) @ deqf.t()
            row: dict[str, str] = {}

            def us(t: float, nbytes: int) -> str:
                return f"{t * 1e6:.1f} ({nbytes / t / 1e9:.0f} GB/s)"

            t = time_graph(lambda: [F.linear(x, w) for w in w16s]) / len(w16s)
            row["bf16"] = us(t, n * k * 2)
            cands = SMALL if m <= 64 else LARGE
            for kind, qs, ref, scale in (("int8", q8s, ref8, s8), ("fp8", qfs, reff, sf)):
                for fp8_dot in ((False,) if kind == "int8" else (False, True)):
                    results = []
                    for c in cands:
                        if time.time() - t0 > args.budget_s:
                            break
                        c = GemvConfig(c.block_n, c.block_k, c.num_warps, c.num_stages,
                                       c.block_m, fp8_dot=fp8_dot)
                        try:
                            got = gemv(x, qs[0], None, config=c, scale=scale)
                            torch.cuda.synchronize()
                        except Exception as e:  # noqa: BLE001 - a tile that does not compile
                            print(f"{name} m={m} {kind} {c}: {type(e).__name__}", flush=True)
                            continue
                        err = rel(got, ref)
                        if err > 2e-2:
                            print(f"{name} m={m} {kind} {c}: wrong (rel {err:.2e})", flush=True)
                            continue
                        tt = time_graph(lambda c=c, qs=qs, scale=scale: [
                            gemv(x, q, None, config=c, scale=scale) for q in qs]) / copies
                        results.append((tt, c))
                    col = kind if kind == "int8" else ("fp8_e4m3" if fp8_dot else "fp8_fp16")
                    if results:
                        tt, c = min(results, key=lambda r: r[0])
                        row[col] = us(tt, n * k) + (f" {c.block_m or '-'}x{c.block_n}x"
                                                    f"{c.block_k} w{c.num_warps} s{c.num_stages}")
                        key = (n, k, m)
                        prev = best[kind].get(key)
                        if prev is None or tt < prev[0]:  # type: ignore[index]
                            best[kind][key] = (tt, c)  # type: ignore[assignment]
                    else:
                        row[col] = "-"
            t = time_graph(lambda: [F.linear(x, q.to(torch.bfloat16)) * s8 for q in q8s]) / copies
            row["int8_deq"] = us(t, n * k)
            if rel(F.linear(x, q8.to(torch.bfloat16)).float() * s8, ref8) > 2e-2:
                row["int8_deq"] += " WRONG"

            def scaled(q: torch.Tensor) -> torch.Tensor:
                a, a_s = quantize_fp8_per_token(x)
                return torch._scaled_mm(a, q.t(), scale_a=a_s, scale_b=sf.view(1, n),
                                        out_dtype=torch.bfloat16)

            t = time_graph(lambda: [scaled(q) for q in qfs]) / copies
            row["scaled_mm"] = us(t, n * k)
            if rel(scaled(qf), reff) > 2e-2:
                row["scaled_mm"] += " WRONG"
            lines.append(f"| {name} | {m} | {row['bf16']} | {row.get('int8', '-')} | "
                         f"{row['int8_deq']} | {row.get('fp8_fp16', '-')} | "
                         f"{row.get('fp8_e4m3', '-')} | {row['scaled_mm']} |")
            print(lines[-1], flush=True)
    lines += ["", "Best tiles (time us, config):", "", "```python"]
    for kind, table in best.items():
        lines.append(f"# {kind}")
        for key, (tt, c) in sorted(table.items()):  # type: ignore[misc]
            lines.append(f"{key}: {c},  # {tt * 1e6:.1f} us")
    lines += ["```", "", f"copy bandwidth assumed {bw / 1e12:.2f} TB/s; sweep took "
              f"{time.time() - t0:.0f} s"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines[-30:]))


if __name__ == "__main__":
    main()
