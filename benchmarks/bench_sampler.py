"""Top-k / top-p truncation on the GPU: the sort-based reference (flatout.kernels.reference,
the path the sampler took before the kernel) against the sort-free kernel
(flatout.kernels.top_k_top_p), at GLM-4's vocabulary, plus a whole sampler step with each.

    python benchmarks/bench_sampler.py --out benchmarks/results/sampler_h200.md

First checks the kernel and the reference on random logits (fp32, bf16-rounded with ties, -inf
masks, rows with one token left; batches that take each launch mode): a row that keeps anything
outside the float64 kept set at top_p + 1e-4, or misses anything of the one at top_p - 1e-4,
stops the script before anything is timed. Then times
(triton.testing.do_bench, median, L2 flushed between calls) each truncation on its own copy of
the logits; the copy's own time is measured and subtracted. Prints a markdown table and writes
it to --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch
import triton
from triton.testing import do_bench

from flatout.kernels import reference
from flatout.kernels.ops import REFERENCE_OPS, triton_ops
from flatout.kernels.top_k_top_p import MAX_CANDIDATES, top_k_top_p
from flatout.layers.sampler import Sampler, SamplingBatch, SamplingRow
from flatout.sampling_params import SamplingParams

NEG_INF = float("-inf")


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    top_k: int | None  # None: no row has top-k
    top_p: float | None  # None: no row has top-p
    k_on_half: bool = False  # top-k only on every other row (the rest have none)

    def tensors(self, B: int, V: int, dev: torch.device):
        """(top_k, top_p, max_top_k, top_k_every_row) as the sampler passes them."""
        top_k = top_p = None
        max_k, every = 0, False
        if self.top_k is not None:
            ks = [self.top_k if (b % 2 == 0 or not self.k_on_half) else V for b in range(B)]
            top_k = torch.tensor(ks, device=dev)
            max_k, every = self.top_k, max(ks) < V
        if self.top_p is not None:
            top_p = torch.full((B,), self.top_p, device=dev)
        return top_k, top_p, max_k, every

    def path(self, B: int) -> str:
        """Which way kernels.top_k_top_p goes for this config."""
        if self.top_p is None:
            return "topk cut (as the reference)"
        if self.top_k is not None and not self.k_on_half and self.top_k <= MAX_CANDIDATES:
            return "topk candidates"
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        return "radix, 9 launches" if B < 2 * sms else "radix, 1 launch"

    def params(self, b: int) -> SamplingParams:
        k = self.top_k if self.top_k is not None and (b % 2 == 0 or not self.k_on_half) else 0
        return SamplingParams(temperature=1.0, top_k=k, top_p=self.top_p or 1.0)


CONFIGS = [
    Config("top_p=0.9", None, 0.9),
    Config("top_k=50", 50, None),
    Config("top_k=50, top_p=0.9", 50, 0.9),
    Config("top_p=0.9, top_k=50 on half the rows", 50, 0.9, k_on_half=True),
]


def make_logits(B: int, V: int, scale: float, dev: torch.device, seed: int) -> torch.Tensor:
    g = torch.Generator(dev).manual_seed(seed)
    return torch.randn(B, V, device=dev, generator=g) * scale


def kept_bounds(logits: torch.Tensor, cfg_args, delta: float = 1e-4):
    """([B, V], [B, V]) bool: the float64 kept sets at top_p - delta and top_p + delta. An fp32
    path sums the masses in its own order, so it may keep any set between the two (kept sets
    grow with top_p), and no other."""
    top_k, top_p, max_k, every = cfg_args
    x = logits.double()
    if top_p is None:
        keep = torch.isfinite(reference.top_k_top_p(x, top_k, None, max_k, every))
        return keep, keep
    live = top_p < 1.0  # rows at 1 keep everything
    lo = torch.where(live, top_p - delta, top_p).clamp(min=1e-30)
    hi = torch.where(live, top_p + delta, top_p).clamp(max=1.0)
    return (torch.isfinite(reference.top_k_top_p(x.clone(), top_k, lo, max_k, every)),
            torch.isfinite(reference.top_k_top_p(x.clone(), top_k, hi, max_k, every)))


def check(V: int, dev: torch.device) -> None:
    """The kernel (and the reference) keep, on every row, a set between the float64 kept sets at
    top_p -+ 1e-4, with the logits' own values; otherwise exit 1."""
    cases = 0
    for B in (1, 7, 64, 300):  # 300 rows: one program per row, one launch; fewer: chunked
        for seed, cfg in enumerate(CONFIGS + [Config("top_p=0.3, top_k=3000", 3000, 0.3)]):
            logits = make_logits(B, V, scale=1.0 + 2.0 * (seed % 3), dev=dev, seed=seed)
            if seed % 2:
                logits = logits.bfloat16().float()  # an LM head's bf16 logits: many ties
            mask = torch.rand(B, V, device=dev) < 0.2  # a bias / grammar's -inf
            logits[mask] = NEG_INF
            if B > 1:
                logits[B - 1, 1:] = NEG_INF  # one token left
            args = cfg.tensors(B, V, dev)
            lo, hi = kept_bounds(logits, args)
            for name, fn in (("kernel", top_k_top_p), ("reference", reference.top_k_top_p)):
                out = fn(logits.clone(), *args)
                keep = torch.isfinite(out)
                wrong = ((lo & ~keep) | (keep & ~hi)).any(dim=1)
                wrong |= (out != torch.where(keep, logits, NEG_INF)).any(dim=1)
                if wrong.any():
                    row = int(wrong.nonzero()[0])
                    print(f"{name.upper()} WRONG: B={B} V={V} {cfg.name}: {int(wrong.sum())} "
                          f"rows, row {row} keeps {int(keep[row].sum())} tokens, float64 "
                          f"{int(lo[row].sum())}..{int(hi[row].sum())}", file=sys.stderr)
                    sys.exit(1)
            cases += 1
    print(f"check: kernel and reference within the float64 bounds on {cases} cases (V={V})",
          flush=True)


def bench_ms(fn, rep: int) -> float:
    return float(do_bench(fn, warmup=max(5, rep // 4), rep=rep, return_mode="median"))


def time_truncation(B: int, V: int, cfg: Config, scale: float, rep: int,
                    dev: torch.device) -> tuple[float, float]:
    """(sort ms, kernel ms) for one truncation, the logits copy subtracted."""
    logits = make_logits(B, V, scale, dev, seed=B)
    buf = torch.empty_like(logits)
    args = cfg.tensors(B, V, dev)

    def copy() -> None:
        buf.copy_(logits)

    def sort_path() -> None:
        reference.top_k_top_p(buf.copy_(logits), *args)

    def kernel_path() -> None:
        top_k_top_p(buf.copy_(logits), *args)

    kernel_path()  # compile before timing
    torch.cuda.synchronize()
    base = bench_ms(copy, rep)
    return bench_ms(sort_path, rep) - base, bench_ms(kernel_path, rep) - base


def time_sampler(B: int, V: int, cfg: Config, scale: float, rep: int,
                 dev: torch.device) -> tuple[float, float]:
    """(sort ms, kernel ms) for a whole sampler step (temperature, truncation, softmax, noise,
    draw) on fresh logits; the copy is subtracted as above."""
    logits = make_logits(B, V, scale, dev, seed=B + 1)
    buf = torch.empty_like(logits)
    rows = [SamplingRow(cfg.params(b), [], []) for b in range(B)]
    batch = SamplingBatch.build(rows, V, dev)
    with_sort = Sampler(dev)
    with_sort.ops = dataclasses.replace(triton_ops(), top_k_top_p=REFERENCE_OPS.top_k_top_p)
    with_kernel = Sampler(dev)
    assert with_kernel.ops.top_k_top_p is top_k_top_p
    with_kernel(buf.copy_(logits), batch)
    torch.cuda.synchronize()
    base = bench_ms(lambda: buf.copy_(logits), rep)
    return (bench_ms(lambda: with_sort(buf.copy_(logits), batch), rep) - base,
            bench_ms(lambda: with_kernel(buf.copy_(logits), batch), rep) - base)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="markdown file to write")
    ap.add_argument("--vocab", type=int, default=151552, help="GLM-4's padded vocabulary")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--scale", type=float, default=3.0, help="logits ~ N(0, scale^2)")
    ap.add_argument("--rep", type=int, default=200, help="do_bench time per measurement, ms")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_sampler needs a CUDA GPU")
    dev = torch.device("cuda")
    V = args.vocab
    batches = [int(b) for b in args.batches.split(",")]

    started = time.time()
    check(V, dev)
    check(50257, dev)  # a vocabulary that is no multiple of the block

    rows = []
    for B in batches:
        for cfg in CONFIGS:
            sort_ms, kernel_ms = time_truncation(B, V, cfg, args.scale, args.rep, dev)
            step_sort, step_kernel = time_sampler(B, V, cfg, args.scale, args.rep, dev)
            rows.append(f"| {B} | {cfg.name} | {cfg.path(B)} | {sort_ms:.3f} | {kernel_ms:.3f} | "
                        f"{sort_ms / max(kernel_ms, 1e-6):.1f}x | {step_sort:.3f} | "
                        f"{step_kernel:.3f} |")
            print(rows[-1], flush=True)

    command = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    lines = [
        "# Top-k / top-p: sort-based reference vs sort-free kernel",
        "",
        f"`{command}`",
        "",
        f"{torch.cuda.get_device_name(dev)}, torch {torch.__version__}, triton "
        f"{triton.__version__}; vocabulary {V}, fp32 logits ~ N(0, {args.scale:g}^2); "
        f"do_bench medians ({args.rep} ms each) with L2 flushed, minus the time of copying the "
        f"logits; {time.time() - started:.0f} s in all. Kernel checked against the reference "
        "first (kept sets within float64's at top_p -+ 1e-4).",
        "",
        "Truncation: `reference.top_k_top_p` (torch.topk for top-k, a full sort for top-p) and "
        "`kernels.top_k_top_p` (the same topk for top-k alone; topk candidates when every row "
        "has top-k; radix passes otherwise). Sampler step: `Sampler` with either, temperature "
        "1 (truncation, softmax, exponential noise, argmax).",
        "",
        "| batch | truncation | kernel path | sort ms | kernel ms | speedup | "
        "sampler step, sort ms | sampler step, kernel ms |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]
    text = "\n".join(lines)
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
