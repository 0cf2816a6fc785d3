"""GPU benchmark: `--kv-cache-dtype fp8` against `auto` (bf16) on GLM-4-9B shapes.

    python benchmarks/bench_kv_fp8.py --out DIR [--model glm-4-9b] [--batch 64] [--context 8192]

Two parts, each engine in a process of its own (so their memory never meets):
  1. the engine (`load_format="dummy"`, CUDA graphs): `--batch` sequences of `--context` prompt
     tokens, then the steady decode step time (median interval between steps) with auto and with
     fp8 KV, beside the floor (weight bytes + KV bytes read per step over the measured copy
     bandwidth) and the KV capacity each gets from the same memory;
  2. the paged decode attention kernel alone, one layer's call at the same shape (32 query heads
     on 2 KV heads, head dim 128, blocks of 16 scattered over the cache), timed as a replayed CUDA
     graph: the engine's launch settings and the best of a sweep (splits x tile x warps), the KV
     bytes read per call and the bandwidth that makes, and fp8's output error against bf16;
  3. accuracy: greedy tokens of fp8 against auto through the engine on the GPU (bf16, CUDA
     graphs) on a tiny random GLM-4 checkpoint (tests/helpers/tiny_checkpoints.py).
Writes DIR/bench_kv_fp8.json and DIR/bench_kv_fp8.md (the tables and the command). Each part
leaves its JSON in DIR; with --reuse a later call runs only the parts still missing (to split the
run over several calls of a limited length).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode_timing import steady_decode  # noqa: E402 - beside this file

DECODE_STEPS = 48


def copy_bandwidth() -> float:
    """Bytes read + written per second of a 1 GiB device-to-device copy."""
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    return 2 * n * 20 / (s.elapsed_time(e) / 1e3)


# -- 1. the engine -------------------------------------------------------------------------
def run_engine(model: str, kv_cache_dtype: str, batch: int, context: int) -> dict:
    from flatout import LLM, SamplingParams
    from flatout.engine.messages import EngineCoreRequest
    from flatout.monitor.step_clock import StepCost

    t0 = time.monotonic()
    llm = LLM(model, load_format="dummy", max_model_len=context + DECODE_STEPS + 16,
              max_num_seqs=batch, max_num_batched_tokens=8192, enable_prefix_caching=False,
              kv_cache_dtype=kv_cache_dtype)
    core = llm.engine.core
    cfg = core.model_config
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.0, max_tokens=DECODE_STEPS, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(100, cfg.vocab_size - 100, (context,), generator=gen).tolist()
        core.add_request(EngineCoreRequest(f"r{i}", ids, params, DECODE_STEPS))
    timing = steady_decode(core)
    kv_per_token = cfg.kv_cache_bytes_per_token(kv_cache_dtype)
    # the step's mean context: the prompt plus half the decoded tokens
    kv_read = batch * (context + DECODE_STEPS // 2) * kv_per_token
    return {
        "kv_cache_dtype": kv_cache_dtype, "startup_s": time.monotonic() - t0,
        "cuda_graphs": core.runner.graphs is not None,
        "kv_tokens": core.cache_config.num_blocks * core.cache_config.block_size,
        "kv_cache_bytes": core.runner.memory.kv_cache, "kv_bytes_per_token": kv_per_token,
        # read every step (an untied input embedding is gathered, not read)
        "weight_bytes": StepCost.of(cfg).weight_bytes,
        "kv_read_bytes": kv_read, **timing,
    }


# -- 2. the decode attention kernel --------------------------------------------------------
def run_kernel(batch: int, context: int, quick: bool) -> dict:
    from triton.testing import do_bench_cudagraph

    from flatout.kernels import reference
    from flatout.kernels.decode_attention import decode_num_splits, paged_decode_attention

    dev = torch.device("cuda")
    heads, kv, dim, block = 32, 2, 128, 16
    width = -(-context // block)
    gen = torch.Generator(device=dev).manual_seed(0)
    nblocks = batch * width + 1
    k = torch.randn(nblocks, block, kv, dim, dtype=torch.bfloat16, device=dev, generator=gen)
    v = torch.randn(nblocks, block, kv, dim, dtype=torch.bfloat16, device=dev, generator=gen)
    q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device=dev, generator=gen)
    tables = torch.randperm(nblocks - 1, device=dev, generator=gen).to(torch.int32)
    tables = tables.view(batch, width)  # each sequence's pages scattered over the cache
    lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    # fp8 with per-tensor scales from the data (amax / 448), as a calibrated checkpoint gives
    k_scale = (k.float().abs().amax() / 448).reshape(())
    v_scale = (v.float().abs().amax() / 448).reshape(())
    k8, v8 = reference.quantize_kv(k, k_scale), reference.quantize_kv(v, v_scale)
    scale = dim**-0.5
    default_splits = decode_num_splits(batch, kv, width, block, dev)
    out_bf16 = paged_decode_attention(q, k, v, tables, lens, scale)
    out_fp8 = paged_decode_attention(q, k8, v8, tables, lens, scale, k_scale, v_scale)
    err = ((out_fp8.float() - out_bf16.float()).norm() / out_bf16.float().norm()).item()
    rows = []
    near = {max(1, default_splits // 2), default_splits, 2 * default_splits}
    sweep = itertools.product(sorted(near), [64, 128], [4, 8])
    settings = [(default_splits, 64, 4)] + ([] if quick else list(sweep))
    for name, caches, elem in (("auto (bf16)", (k, v, None, None), 2),
                               ("fp8", (k8, v8, k_scale, v_scale), 1)):
        kc, vc, ks, vs = caches
        out = torch.empty_like(q)
        seen = set()
        for splits, block_n, warps in settings:
            if (splits, block_n, warps) in seen:
                continue
            seen.add((splits, block_n, warps))

            def fn(kc=kc, vc=vc, ks=ks, vs=vs, out=out, splits=splits, block_n=block_n,
                   warps=warps) -> None:  # noqa: ANN001
                paged_decode_attention(q, kc, vc, tables, lens, scale, ks, vs, out=out,
                                       num_splits=splits, block_n=block_n, num_warps=warps)

            try:
                fn()
                # do_bench_cudagraph runs on a stream of its own, which does not wait for the
                # default one: everything above (caches, tables) must be written first
                torch.cuda.synchronize()
                ms = do_bench_cudagraph(fn, rep=50)
            except Exception as e:  # noqa: BLE001 - a setting that does not compile is skipped
                print(f"{name} splits {splits} block_n {block_n} warps {warps}: {e}",
                      file=sys.stderr)
                continue
            kv_bytes = 2 * batch * context * kv * dim * elem
            rows.append({"kv_cache": name, "splits": splits, "block_n": block_n,
                         "warps": warps, "us": ms * 1e3, "kv_bytes": kv_bytes,
                         "GBps": kv_bytes / (ms / 1e3) / 1e9,
                         "default": (splits, block_n, warps) == (default_splits, 64, 4)})
    return {"rows": rows, "fp8_rel_error": err, "default_splits": default_splits,
            "shape": {"batch": batch, "context": context, "heads": heads, "kv_heads": kv,
                      "head_dim": dim, "block_size": block}}


# -- 3. greedy agreement on a tiny checkpoint ----------------------------------------------
def run_agreement() -> dict:
    import tempfile

    from flatout import LLM, SamplingParams
    from tests.helpers.tiny_checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint("GlmForCausalLM", Path(tempfile.mkdtemp()) / "tiny_glm")
    gen = torch.Generator().manual_seed(0)
    lens = [3, 70, 17, 41, 9, 100, 33, 5, 250, 128, 64, 12]
    prompts = [torch.randint(0, 301, (n,), generator=gen).tolist() for n in lens]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    outs = {}
    for dtype in ("auto", "fp8"):
        llm = LLM(str(path), dtype="bfloat16", kv_cache_dtype=dtype, num_kv_blocks=256)
        outs[dtype] = [o.token_ids for o in llm.generate(prompts, params)]
        del llm
    pairs = list(zip(outs["auto"], outs["fp8"], strict=True))
    same = sum(a == b for x, y in pairs for a, b in zip(x, y, strict=True))
    return {"sequences": len(pairs), "tokens": 32, "identical": sum(x == y for x, y in pairs),
            "position_agreement": same / (32 * len(pairs))}


# -- report --------------------------------------------------------------------------------
def report(data: dict) -> str:
    bw = data["copy_bandwidth_Bps"]
    b, ctx = data["batch"], data["context"]
    lines = [f"# --kv-cache-dtype fp8 vs auto: {data['model']} (dummy weights), {data['device']}",
             "", f"Command: `{data['command']}`", "",
             f"Copy bandwidth measured: {bw / 1e12:.2f} TB/s (read + written). torch "
             f"{data['torch']}.", "",
             f"## Decode step, batch {b} x context {ctx} (CUDA graphs)", "",
             "| KV cache | step (ms) | floor (ms) | MBU | KV read / step (GB) | KV capacity "
             "(tokens) | GPU busy |", "|---|---|---|---|---|---|---|"]
    for e in data["engine"]:
        if "error" in e:
            lines.append(f"| {e['kv_cache_dtype']} | failed: {e['error']} | | | | | |")
            continue
        floor = (e["weight_bytes"] + e["kv_read_bytes"]) / bw
        lines.append(
            f"| {e['kv_cache_dtype']} | {e['step_ms']:.2f} | {floor * 1e3:.2f} | "
            f"{floor * 1e3 / e['step_ms']:.0%} | {e['kv_read_bytes'] / 1e9:.2f} | "
            f"{e['kv_tokens']:,} | {e['gpu_busy_events']:.0%} |")
    agree = data.get("agreement")
    if agree:
        lines += ["", f"Greedy agreement, tiny random GLM-4 (bf16, CUDA graphs): fp8 KV gave "
                  f"{agree['identical']} of {agree['sequences']} sequences of {agree['tokens']} "
                  f"tokens identical to auto, {agree['position_agreement']:.0%} of positions."]
    k = data.get("kernel")
    if k:
        lines += ["", f"## Decode attention alone: one layer's call, batch {b} x context {ctx}, "
                  "32 query heads on 2 KV heads, head dim 128 (replayed CUDA graph)", "",
                  f"fp8 output vs bf16 (per-tensor scales amax/448): relative error "
                  f"{k['fp8_rel_error']:.4f}.", "",
                  "| KV cache | settings | us / call | KV bytes / call (MB) | GB/s | "
                  "of copy BW |", "|---|---|---|---|---|---|"]
        for name in ("auto (bf16)", "fp8"):
            rows = [r for r in k["rows"] if r["kv_cache"] == name]
            if not rows:
                continue
            best = min(rows, key=lambda r: r["us"])
            for label, r in (("engine's", next((r for r in rows if r["default"]), None)),
                             ("best of sweep", best)):
                if r is None:
                    continue
                lines.append(
                    f"| {name} | {label}: splits {r['splits']}, block_n {r['block_n']}, "
                    f"warps {r['warps']} | {r['us']:.1f} | {r['kv_bytes'] / 1e6:.1f} | "
                    f"{r['GBps']:.0f} | {r['GBps'] * 1e9 / bw:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="glm-4-9b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--quick", action="store_true", help="no kernel sweep")
    ap.add_argument("--reuse", action="store_true",
                    help="keep the parts already in DIR (a run split over several calls)")
    ap.add_argument("--part", choices=["all", "engine", "kernel"], default="all")
    ap.add_argument("--kv-cache-dtype", default="auto", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.part == "engine":
        res = run_engine(a.model, a.kv_cache_dtype, a.batch, a.context)
        (out / f"engine_{a.kv_cache_dtype}.json").write_text(json.dumps(res, indent=1))
        return
    if a.part == "kernel":
        res = run_kernel(a.batch, a.context, a.quick)
        res["agreement"] = run_agreement()
        (out / "kernel.json").write_text(json.dumps(res, indent=1))
        return
    base = [sys.executable, __file__, "--out", str(out), "--model", a.model, "--batch",
            str(a.batch), "--context", str(a.context)] + (["--quick"] if a.quick else [])
    parts = [(out / "engine_auto.json", ["--part", "engine", "--kv-cache-dtype", "auto"]),
             (out / "engine_fp8.json", ["--part", "engine", "--kv-cache-dtype", "fp8"]),
             (out / "kernel.json", ["--part", "kernel"])]
    for path, args in parts:  # each in a process of its own
        if a.reuse and path.exists():
            continue
        path.unlink(missing_ok=True)
        try:
            subprocess.run(base + args, timeout=900, check=False)
        except subprocess.TimeoutExpired:
            print(f"{' '.join(args)}: timed out", file=sys.stderr)
    engine = [json.loads(p.read_text()) if p.exists()
              else {"kv_cache_dtype": p.stem.split("_")[1], "error": "no result (see stderr)"}
              for p, _ in parts[:2]]
    kernel = json.loads(parts[2][0].read_text()) if parts[2][0].exists() else None
    cmd = (f"python benchmarks/bench_kv_fp8.py --out DIR --model {a.model} --batch {a.batch} "
           f"--context {a.context}" + (" --quick" if a.quick else ""))
    data = {"model": a.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "copy_bandwidth_Bps": copy_bandwidth(), "batch": a.batch, "context": a.context,
            "engine": engine, "kernel": kernel, "command": cmd,
            "agreement": kernel.pop("agreement", None) if kernel else None}
    (out / "bench_kv_fp8.json").write_text(json.dumps(data, indent=1))
    (out / "bench_kv_fp8.md").write_text(report(data))
    print((out / "bench_kv_fp8.md").read_text())


if __name__ == "__main__":
    main()
