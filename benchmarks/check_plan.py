"""`flatout plan` against what the engine really reserves on the GPU.

    python benchmarks/check_plan.py --out DIR [--model glm-4-9b] [--gpus 2x24GB]
                                    [--quantization int8]

The GPUs of the plan are emulated on bigger ones: the engine runs with a
gpu_memory_utilization that leaves it the plan's usable bytes (utilization x the planned
size) of the real card, and the plan's per-GPU figures are set beside rank 0's measured ones
(weights allocated, profiled activation peak, memory outside torch, KV cache tokens). Then a
configuration the plan says cannot fit (one GPU of that size, a long max_model_len) must be
refused at engine startup, before any weight is loaded, with the plan's reason (the long
max_model_len is capped at the model's context: GLM-4V-9B's 8192 in bf16 on one 24 GB GPU
cannot fit its weights).
Writes DIR/check_plan.md and DIR/check_plan.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 1 << 30


def main() -> None:
    from flatout import LLM
    from flatout.models.registry import resolve_model_config
    from flatout.plan import make_plan, parse_gpus

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="glm-4-9b")
    ap.add_argument("--gpus", default="2x24GB")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--refuse-max-model-len", type=int, default=131072)
    ap.add_argument("--quantization", default=None)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = parse_gpus(a.gpus)
    total = torch.cuda.mem_get_info(0)[1]
    util = 0.9 * gpus.memory / total  # the engine's usable bytes == the plan's at 0.9
    cfg = resolve_model_config(a.model, load_format="dummy", device_type="cuda",
                               max_model_len=a.max_model_len, quantization=a.quantization)
    plan = make_plan(cfg, gpus, gpus.count, utilization=0.9)
    res: dict = {"gpus": a.gpus, "model": a.model, "quantization": a.quantization,
                 "device": torch.cuda.get_device_name(0),
                 "device_total": total, "emulated_utilization": util, "plan": plan.lines()}

    llm = LLM(a.model, load_format="dummy", tensor_parallel_size=gpus.count,
              max_model_len=a.max_model_len, gpu_memory_utilization=util,
              quantization=a.quantization)
    mem = llm.engine.core.runner.memory
    rows = [
        ("weights", plan.weights, mem.weights),
        ("activations", plan.activations, mem.activations),
        ("runtime (outside torch)", plan.overhead, mem.runtime),
        ("KV cache bytes", plan.kv_budget, mem.kv_cache),
        ("KV cache tokens", plan.kv_tokens, mem.kv_tokens),
    ]
    res["rows"] = [{"what": w, "plan": p, "engine": e} for w, p, e in rows]
    res["cuda_graphs"] = mem.cuda_graphs
    res["generated"] = llm.generate([[100] * 64], None)[0].outputs[0].token_ids[:4]
    llm.engine.core.shutdown()
    del llm

    # a configuration the plan refuses must be refused at startup, with the same reason
    refuse_gpus = parse_gpus(f"1x{gpus.memory / 1e9:g}GB")
    context = resolve_model_config(a.model, load_format="dummy").max_model_len
    refuse_len = min(a.refuse_max_model_len, context)
    cfg_long = resolve_model_config(a.model, load_format="dummy", device_type="cuda",
                                    max_model_len=refuse_len)
    refuse_plan = make_plan(cfg_long, refuse_gpus, 1, utilization=0.9)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated(0)
    t = time.monotonic()
    try:
        LLM(a.model, load_format="dummy", max_model_len=refuse_len,
            gpu_memory_utilization=0.9 * refuse_gpus.memory / total)
        refused = None
    except ValueError as e:
        refused = str(e)
    res["refusal"] = {
        "plan_fits": refuse_plan.fits,
        "plan_reason": refuse_plan.reason(),
        "engine_error": refused,
        "seconds": time.monotonic() - t,
        "allocated_after": torch.cuda.memory_allocated(0) - before,
    }
    (out / "check_plan.json").write_text(json.dumps(res, indent=1))
    (out / "check_plan.md").write_text(report(res))
    print((out / "check_plan.md").read_text())


def report(res: dict) -> str:
    lines = [f"# `flatout plan` vs the engine on {res['device']}", "",
             "Command: `python benchmarks/check_plan.py --out DIR --model " + res["model"]
             + " --gpus " + res["gpus"] + (f" --quantization {res['quantization']}"
                                           if res["quantization"] else "") + "`", "",
             f"{res['gpus']} emulated on {res['device']} "
             f"({res['device_total'] / GIB:.1f} GiB): gpu_memory_utilization "
             f"{res['emulated_utilization']:.4f} leaves the engine 0.9 x the planned size.", "",
             "```", *res["plan"], "```", "",
             "| per GPU (rank 0) | plan | engine | engine / plan |", "|---|---|---|---|"]
    for r in res["rows"]:
        p, e = r["plan"], r["engine"]
        fmt = (lambda v: f"{v}") if "tokens" in r["what"] else (lambda v: f"{v / GIB:.2f} GiB")
        lines.append(f"| {r['what']} | {fmt(p)} | {fmt(e)} | {e / p:.1%} |" if p else
                     f"| {r['what']} | {fmt(p)} | {fmt(e)} | n/a |")
    lines += ["", f"CUDA graph pool after the KV cache: {res['cuda_graphs'] / GIB:.2f} GiB "
              "(inside the plan's runtime reserve).", ""]
    ref = res["refusal"]
    same = bool(ref["engine_error"]) and ref["plan_reason"].split(":")[0] in ref["engine_error"]
    lines += ["## A configuration the plan refuses", "",
              f"Plan fits: {ref['plan_fits']}. Plan's reason: {ref['plan_reason']}", "",
              f"Engine: {'refused' if ref['engine_error'] else 'STARTED'} after "
              f"{ref['seconds']:.1f} s, {ref['allocated_after']} bytes allocated; same reason: "
              f"{same}.", "", "```", (ref["engine_error"] or "").strip(), "```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
