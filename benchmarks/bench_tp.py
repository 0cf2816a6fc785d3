"""Tensor-parallel benchmark: decode step and throughput at TP = 1, 2 (4), and the all-reduce share.

    python benchmarks/bench_tp.py --out DIR [--model glm-4-9b] [--tp 1,2] [--quick]

For each TP size, in a process of its own (so GPU memory never meets):
  1. the collectives alone: one decode step's all-reduces ([batch, hidden] x (2 per layer + the
     embedding)) and the LM head's all-gather, timed over the same process group type (NCCL on
     GPUs, gloo on CPU) at batch 1 and 32;
  2. flatout on the model (dummy weights): decode step time at batch 1 and 32 with 512 tokens of
     context, and the 32 x (512 -> 256 tokens, ignore_eos) workload (output tokens/s).
`--tp 2:nccl` runs TP 2 with --disable-custom-all-reduce: every all-reduce over NCCL, none in the
fused one-shot all-reduce + add + RMSNorm kernel (whose time, add and norm included, the profiler
counts as collective time when it is on).
The all-reduce share of a step = collective time per step / decode step time. Scaling efficiency
of TP = N = step(TP 1) / (N x step(TP N)). Writes DIR/bench_tp.json and DIR/bench_tp.md.
On a machine without GPUs (--quick) it runs a tiny checkpoint with gloo, as a smoke test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode_timing import profile_decode, steady_decode  # noqa: E402 - beside this file


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _collective_rank(rank: int, world: int, port: int, shapes: dict, out: str) -> None:
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world)
    dtype = torch.bfloat16 if cuda else torch.float32
    res = {}
    for batch in shapes["batches"]:
        x = torch.randn(batch, shapes["hidden"], dtype=dtype, device=dev)
        y = torch.randn(batch, -(-shapes["vocab"] // world), dtype=dtype, device=dev)
        parts = [torch.empty_like(y) for _ in range(world)]

        def step(x=x, y=y, parts=parts) -> None:  # noqa: ANN001
            for _ in range(shapes["num_all_reduce"]):
                dist.all_reduce(x)
            dist.all_gather(parts, y)

        for _ in range(3):
            step()
        sync()
        n = 5 if not cuda else 50
        t = time.perf_counter()
        for _ in range(n):
            step()
        sync()
        res[batch] = (time.perf_counter() - t) / n
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    dist.destroy_process_group()


def measure_collectives(tp: int, cfg, batches: list[int], out: Path) -> dict:  # noqa: ANN001
    import torch.multiprocessing as tmp

    from flatout.distributed import free_port

    shapes = {"hidden": cfg.hidden_size, "vocab": cfg.vocab_size, "batches": batches,
              "num_all_reduce": 2 * cfg.num_hidden_layers + 1}
    tmp.spawn(_collective_rank, args=(tp, free_port(), shapes, str(out)), nprocs=tp)
    return {int(k): v for k, v in json.loads(out.read_text()).items()}


def run_tp(model: str, part: str, quick: bool, out: Path) -> dict:
    from flatout import LLM, SamplingParams
    from flatout.engine.messages import EngineCoreRequest
    from flatout.models.registry import resolve_model_config

    batches = [1, 8] if quick else [1, 32]
    cfg = resolve_model_config(model, load_format="dummy",
                               device_type="cuda" if torch.cuda.is_available() else "cpu")
    tp_text, _, variant = part.partition(":")  # "2:nccl": TP 2 without the fused all-reduce
    if variant not in ("", "nccl"):
        raise ValueError(f"unknown TP variant {part!r}: N or N:nccl")
    tp = int(tp_text)
    res: dict = {"tp": tp, "label": part, "collectives_s": {}}
    if tp > 1 and not variant:
        res["collectives_s"] = measure_collectives(tp, cfg, batches, out / f"coll_{tp}.json")
    ctx, n_out = (64, 8) if quick else (512, 256)
    t0 = time.monotonic()
    llm = LLM(model, load_format="dummy", tensor_parallel_size=tp, max_model_len=256 if quick
              else 4096, max_num_seqs=64, max_num_batched_tokens=8192,
              enable_prefix_caching=False, disable_custom_all_reduce=variant == "nccl")
    core = llm.engine.core
    res.update(startup_s=time.monotonic() - t0, num_kv_blocks=core.cache_config.num_blocks,
               cuda_graphs=core.runner.graphs is not None)
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(100, cfg.vocab_size - 100, (n,), generator=gen).tolist()

    decode = []
    for bs in batches:
        for i in range(bs):
            p = SamplingParams(temperature=0.0, max_tokens=12 if quick else 40, ignore_eos=True)
            core.add_request(EngineCoreRequest(f"d{bs}-{i}", prompt(ctx), p, p.max_tokens))
        timing = steady_decode(core)
        for i in range(bs):  # the same again under the profiler: the in-step all-reduce time
            p = SamplingParams(temperature=0.0, max_tokens=12 if quick else 40, ignore_eos=True)
            core.add_request(EngineCoreRequest(f"p{bs}-{i}", prompt(ctx), p, p.max_tokens))
        prof = profile_decode(core, steps=4 if quick else 12)
        step = timing["step_ms"] / 1e3
        coll = prof["collective_ms_per_step"] / 1e3
        eager = res["collectives_s"].get(bs, 0.0)
        decode.append({"batch": bs, "step_ms": step * 1e3, "collective_ms": coll * 1e3,
                       "collective_share": coll / step if step else 0.0,
                       "eager_collective_ms": eager * 1e3, "profile": prof,
                       "gpu_busy_events": timing["gpu_busy_events"]})
    res["decode"] = decode
    num = 4 if quick else 32
    prompts = [prompt(ctx) for _ in range(num)]
    params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    res["workload"] = {"requests": num, "prompt": ctx, "output": n_out, "wall_s": wall,
                       "output_tok_s": tokens / wall}
    core.shutdown()
    return res


def report(runs: list[dict], cmd: str, device: str) -> str:
    lines = [f"# flatout tensor-parallel benchmark ({device})", "", f"Command: `{cmd}`", ""]
    base = next((r for r in runs if r.get("tp") == 1 and "error" not in r), None)
    w0 = next((r["workload"] for r in runs if "workload" in r), {"requests": "?", "prompt": "?",
                                                                    "output": "?"})
    lines += [f"## Decode step (context {w0['prompt']})", "",
              "| TP | batch | step ms | vs TP 1 | scaling eff. | collectives ms/step (profiler) "
              "| share | same collectives alone, eager ms |",
              "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "error" in r:
            lines.append(f"| {r.get('label', r.get('tp'))} | | failed: {r['error'][:100]} | | | "
                         "| | |")
            continue
        for d in r["decode"]:
            ref = next((b for b in base["decode"] if b["batch"] == d["batch"]), None) if base \
                else None
            rel = d["step_ms"] / ref["step_ms"] if ref else None
            eff = ref["step_ms"] / (r["tp"] * d["step_ms"]) if ref else None
            lines.append(
                f"| {r.get('label', r['tp'])} | {d['batch']} | {d['step_ms']:.2f} | "
                f"{f'{rel:.0%}' if rel else 'n/a'} | {f'{eff:.0%}' if eff else 'n/a'} | "
                f"{d['collective_ms']:.2f} | {d['collective_share']:.0%} | "
                f"{d.get('eager_collective_ms', 0):.2f} |")
    lines += ["", f"## Workload: {w0['requests']} requests x ({w0['prompt']} prompt -> "
              f"{w0['output']} output tokens, ignore_eos)", "",
              "| TP | output tok/s | wall s | startup s | CUDA graphs |", "|---|---|---|---|---|"]
    for r in runs:
        if "error" not in r:
            w = r["workload"]
            lines.append(f"| {r.get('label', r['tp'])} | {w['output_tok_s']:.0f} | "
                         f"{w['wall_s']:.1f} | {r['startup_s']:.0f} | {r['cuda_graphs']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="default: glm-4-9b (--quick on CPU: a tiny "
                    "GLM checkpoint written into --out)")
    ap.add_argument("--tp", default="1,2", help="comma-separated TP sizes; N:nccl runs TP N "
                    "with --disable-custom-all-reduce (all-reduces over NCCL only)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model = a.model
    if model is None:
        model = "glm-4-9b"
        if not torch.cuda.is_available():
            from tests.helpers.tiny_checkpoints import make_tiny_checkpoint

            model = str(make_tiny_checkpoint("GlmForCausalLM", out / "tiny-glm"))
    if a.part is not None:
        try:
            res = run_tp(model, a.part, a.quick, out)
        except Exception as e:  # noqa: BLE001 - report, don't abort the whole run
            import traceback

            traceback.print_exc()
            res = {"tp": a.part, "label": a.part, "error": f"{type(e).__name__}: {e}"}
        (out / f"part_tp{a.part.replace(':', '_')}.json").write_text(json.dumps(res, indent=1))
        return
    runs = []
    for tp in a.tp.split(","):
        cmd = [sys.executable, __file__, "--out", str(out), "--model", model, "--part", tp]
        try:
            subprocess.run(cmd + (["--quick"] if a.quick else []), env=os.environ, timeout=280)
        except subprocess.TimeoutExpired:
            print(f"TP {tp} stopped after 280 s", flush=True)
        f = out / f"part_tp{tp.replace(':', '_')}.json"
        runs.append(json.loads(f.read_text()) if f.exists() else {"tp": tp, "error": "no result"})
    device = (f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
              if torch.cuda.is_available() else "CPU, gloo")
    cmd = f"python benchmarks/bench_tp.py --out DIR --tp {a.tp}" + (
        f" --model {a.model}" if a.model else "") + (" --quick" if a.quick else "")
    (out / "bench_tp.json").write_text(json.dumps({"device": device, "runs": runs,
                                                   "command": cmd}, indent=1))
    (out / "bench_tp.md").write_text(report(runs, cmd, device))
    print((out / "bench_tp.md").read_text())


if __name__ == "__main__":
    main()
