"""Weight quantization on the GPU: bf16 / int8 (W8A16) / fp8 (W8A8) side by side in one run.

    python benchmarks/bench_quant.py --out DIR [--model glm-4-9b] [--methods bf16,int8,fp8]
                                     [--part all|bf16|int8|fp8|accuracy|report] [--quick]

Each method runs in a process of its own (so GPU memory never meets), on the model's real shapes
with dummy weights (load_format="dummy"):
  1. decode step time (steady state, CUDA graphs) at batch 1, 32, 128, 256 with 512 tokens of
     context,
     against the floor of (weight bytes + KV bytes read) / measured copy bandwidth, and the
     kernels one batch-1 step spends its time in;
  2. prefill of 8 x 512 tokens (best of 3; one step of 4096 batched tokens), and the seed
     workload 256 x (512 -> 256 tokens, ignore_eos) in output tokens/s;
  "fp8+kvfp8" is fp8 weights with --kv-cache-dtype fp8.
Then accuracy (the `accuracy` part, one process):
  3. per linear of every decoder layer of the dummy model: relative output error of each method's
     kernel vs the bf16 linear, on unit-normal inputs (32 rows, the decode path; 512 rows, the
     prefill path), exact fp32 products as the reference;
  4. a tiny real-architecture model (random weights, GLM-4-9B's layout at hidden 256, bf16 on
     the GPU): teacher-forced top-1 agreement and logits error of each method vs bf16, and
     greedy generations through the engine compared token by token.
Writes DIR/bench_quant.json and DIR/bench_quant.md. `--quick` runs a tiny checkpoint (on CPU
where there is no GPU) as a smoke test of the script itself.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode_timing import profile_decode, steady_decode  # noqa: E402 - beside this file

METHODS = ("bf16", "int8", "fp8", "fp8+kvfp8")  # the last: fp8 weights + --kv-cache-dtype fp8
DECODE_BATCHES = (1, 32, 128, 256)
CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def quantization(method: str) -> str | None:
    return None if method == "bf16" else method.split("+")[0]


def kv_cache_dtype(method: str) -> str:
    return "fp8" if method.endswith("+kvfp8") else "auto"


def tiny_checkpoint(folder: Path, hidden: int = 64) -> str:
    from tests.helpers.tiny_checkpoints import make_tiny_checkpoint

    return str(make_tiny_checkpoint(
        "GlmForCausalLM", folder, hidden_size=hidden, intermediate_size=3 * hidden,
        num_attention_heads=hidden // 32, num_key_value_heads=1, head_dim=32, vocab_size=1024,
        num_hidden_layers=4, max_position_embeddings=4096,
    ))


# -- speed ---------------------------------------------------------------------------------
def run_speed(model: str, method: str, quick: bool) -> dict:
    from flatout import LLM, SamplingParams
    from flatout.engine.messages import EngineCoreRequest

    t0 = time.monotonic()
    llm = LLM(model, load_format="dummy", quantization=quantization(method),
              kv_cache_dtype=kv_cache_dtype(method),
              max_model_len=1024 if quick else 2048, max_num_seqs=256,
              max_num_batched_tokens=4096, enable_prefix_caching=False,
              **({} if CUDA else {"num_kv_blocks": 256}))
    core = llm.engine.core
    cfg = core.model_config
    table = cfg.vocab_size * cfg.hidden_size * cfg.dtype_bytes  # gathered, not read
    res: dict = {"method": method, "startup_s": time.monotonic() - t0,
                 "weight_bytes": cfg.weight_bytes, "read_bytes": cfg.weight_bytes - table,
                 "kv_bytes_per_token": cfg.kv_bytes_per_token,
                 "num_kv_blocks": core.cache_config.num_blocks,
                 "cuda_graphs": core.runner.graphs is not None}
    if CUDA:
        res["gpu_memory_allocated"] = torch.cuda.memory_allocated()
    gen = torch.Generator().manual_seed(0)

    def add(rid: str, n_prompt: int, n_out: int) -> None:
        prompt = torch.randint(100, cfg.vocab_size - 100, (n_prompt,), generator=gen).tolist()
        p = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        core.add_request(EngineCoreRequest(rid, prompt, p, n_out))

    ctx = 64 if quick else 512
    decode = []
    for bs in (1, 4) if quick else DECODE_BATCHES:
        for i in range(bs):
            add(f"d{bs}-{i}", ctx, 40)
        timing = steady_decode(core)
        decode.append({"batch": bs, **timing,
                       "bytes": res["read_bytes"] + bs * (ctx + 20) * cfg.kv_bytes_per_token})
    add("prof", ctx, 40)
    prof = profile_decode(core, top=10)
    res["decode"], res["profile_b1"] = decode, prof
    n, length = (2, 64) if quick else (8, 512)
    times = []
    for rep in range(3):
        for i in range(n):
            add(f"p{rep}-{i}", length, 1)
        sync()
        t = time.perf_counter()
        while core.has_unfinished():
            core.step()
        sync()
        times.append(time.perf_counter() - t)
    res["prefill"] = {"shape": f"{n} x {length}", "tokens": n * length, "s": min(times)}
    # the seed workload: N x (512 -> 256 tokens, ignore_eos) through the offline API
    num, n_in, n_out = (4, 64, 16) if quick else (256, 512, 256)
    prompts = [torch.randint(100, cfg.vocab_size - 100, (n_in,), generator=gen).tolist()
               for _ in range(num)]
    t = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n_out,
                                                ignore_eos=True))
    wall = time.perf_counter() - t
    res["workload"] = {"requests": num, "output_tok_s": sum(len(o.token_ids) for o in outs) / wall,
                       "wall_s": wall}
    core.shutdown()
    return res


# -- accuracy ------------------------------------------------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _quantized_kernels(device: torch.device) -> dict:
    from flatout.kernels import reference
    from flatout.kernels.ops import ops_for

    ops = ops_for(device)
    return {"int8": (reference.quantize_int8, ops.linear_w8a16),
            "fp8": (reference.quantize_fp8, ops.linear_w8a8_fp8)}


def per_linear_error(model_name: str, methods: list[str], quick: bool) -> dict:
    """Each method's output error per linear of the dummy model (and bf16's own), vs fp32."""
    from flatout.models.registry import load_model, resolve_model_config

    device = torch.device("cuda" if CUDA else "cpu")
    cfg = resolve_model_config(model_name, dtype="bfloat16", device_type=device.type,
                               load_format="dummy", max_model_len=1024)
    model = load_model(cfg, device)
    kernels = _quantized_kernels(device)
    g = torch.Generator(device).manual_seed(0)
    rows_list = (4, 80) if quick else (32, 512)
    errors: dict[str, dict[str, list[float]]] = {}
    linears = [(name, lin.weight) for layer in model.model.layers for name, lin in (
        ("qkv", layer.self_attn.qkv_proj), ("o", layer.self_attn.o_proj),
        ("gate_up", layer.mlp.gate_up_proj), ("down", layer.mlp.down_proj))]
    linears.append(("lm_head (--quantize-lm-head)", model.lm_head.weight))
    for name, w in linears:
        quantized = {m: kernels[m][0](w) for m in methods if m != "bf16"}
        for rows in rows_list:
            x = torch.randn(rows, w.shape[1], device=device, generator=g).bfloat16()
            exact = x.float() @ w.float().T
            per = errors.setdefault(f"{name} x{rows}", {})
            per.setdefault("bf16", []).append(_rel(torch.nn.functional.linear(x, w), exact))
            for m, (q, s) in quantized.items():
                per.setdefault(m, []).append(_rel(kernels[m][1](x, q, s, None), exact))
    del model
    if CUDA:
        torch.cuda.empty_cache()
    return {key: {m: {"median": statistics.median(v), "max": max(v)} for m, v in per.items()}
            for key, per in errors.items()}


def tiny_model_agreement(methods: list[str], quick: bool) -> dict:
    """Teacher-forced top-1 agreement / logits error and greedy engine tokens vs bf16 on a tiny
    real-architecture (GLM-4-9B layout) random model in bf16."""
    from flatout import LLM, SamplingParams
    from flatout.models.registry import load_model, resolve_model_config
    from tests.helpers.logits import flatout_logits, random_prompts

    device = torch.device("cuda" if CUDA else "cpu")
    dtype = "bfloat16" if CUDA else "float32"
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        path = tiny_checkpoint(Path(d) / "glm", hidden=64 if quick else 256)
        prompts = random_prompts(1024, [37, 64, 128, 9] if quick else [200, 333, 512, 91, 64])
        logits = {}
        for m in methods:
            cfg = resolve_model_config(path, dtype=dtype, device_type=device.type,
                                       quantization=quantization(m))
            model = load_model(cfg, device)
            logits[m] = torch.cat(flatout_logits(model, [p.to(device) for p in prompts]))
            del model
        greedy = {}
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        gen_prompts = [p.tolist()[:48] for p in prompts]
        for m in methods:
            llm = LLM(path, dtype=dtype, quantization=quantization(m), max_model_len=1024,
                      **({} if CUDA else {"num_kv_blocks": 128}))
            try:
                greedy[m] = [o.outputs[0].token_ids for o in llm.generate(gen_prompts, params)]
            finally:
                llm.engine.core.shutdown()
    ref = logits["bf16"]
    for m in methods:
        if m == "bf16":
            continue
        same = sum(a == b for w, g in zip(greedy["bf16"], greedy[m], strict=True)
                   for a, b in zip(w, g, strict=True))
        first = [next((i for i, (a, b) in enumerate(zip(w, g, strict=True)) if a != b), len(w))
                 for w, g in zip(greedy["bf16"], greedy[m], strict=True)]
        out[m] = {"positions": int(ref.shape[0]),
                  "top1_agreement": (logits[m].argmax(-1) == ref.argmax(-1)).float().mean().item(),
                  "logits_rel_error": _rel(logits[m], ref),
                  "greedy_same": same, "greedy_total": sum(len(w) for w in greedy["bf16"]),
                  "greedy_first_difference": first}
    return out


def run_accuracy(model: str, methods: list[str], quick: bool) -> dict:
    methods = [m for m in methods if "+" not in m]  # weight formats only
    return {"per_linear": per_linear_error(model, methods, quick),
            "tiny_model": tiny_model_agreement(methods, quick)}


# -- report --------------------------------------------------------------------------------
def report(device: dict, parts: dict, acc: dict, cmd: str, model: str) -> str:
    bw = device.get("copy_bandwidth_Bps")
    lines = [f"# Weight quantization: {model}, bf16 / int8 / fp8", "", f"Command: `{cmd}`", ""]
    if bw:
        lines += [f"Device: {device['name']}, torch {device['torch']}; measured copy bandwidth "
                  f"{bw / 1e12:.2f} TB/s. Dummy weights; floor = (weights read + KV read) / "
                  f"copy bandwidth (the embedding table is gathered, not read).", ""]
    base = parts.get("bf16", {})
    batches = next((r["decode"] for r in parts.values() if "decode" in r), [])
    lines += ["Decode steps (context ~512): ms, and MBU = floor / step; prefill: best of 3; "
              "x bf16 = time / bf16's time.", "",
              "| method | weights GB | KV blocks | "
              + " | ".join(f"decode b{d['batch']} ms (MBU)" for d in batches)
              + " | prefill ms | x bf16 (" + " / ".join(f"b{d['batch']}" for d in batches)
              + " / prefill) | N x (512 -> 256) tok/s |",
              "|---|---|---|" + "---|" * (len(batches) + 3)]
    for m, r in parts.items():
        if "error" in r:
            lines.append(f"| {m} | failed: {r['error'][:200]} |")
            continue
        cells = [m, f"{r['weight_bytes'] / 1e9:.2f}", str(r["num_kv_blocks"])]
        for d in r["decode"]:
            mbu = f" ({d['bytes'] / bw * 1e3 / d['step_ms']:.0%})" if bw else ""
            cells.append(f"{d['step_ms']:.2f}{mbu}")
        cells.append(f"{r['prefill']['s'] * 1e3:.1f} ({r['prefill']['shape']})")
        if "decode" in base:
            ratios = [d["step_ms"] / b["step_ms"] for d, b in zip(r["decode"], base["decode"],
                                                                  strict=True)]
            ratios.append(r["prefill"]["s"] / base["prefill"]["s"])
            cells.append(" / ".join(f"{x:.2f}" for x in ratios))
        else:
            cells.append("")
        w = r.get("workload")
        cells.append(f"{w['output_tok_s']:.0f} ({w['requests']} requests)" if w else "")
        lines.append("| " + " | ".join(cells) + " |")
    for m, r in parts.items():
        prof = r.get("profile_b1")
        if not prof:
            continue
        lines += ["", f"### {m}: kernels of a decode step at batch 1 "
                  f"({prof['kernel_ms_per_step']:.2f} ms of kernels per step)", "",
                  "| kernel | ms/step |", "|---|---|"]
        for k in prof["top_kernels"]:
            lines.append(f"| `{k['name'].replace('|', '/')}` | {k['ms_per_step']:.3f} |")
    if acc.get("per_linear"):
        methods = list(next(iter(acc["per_linear"].values())))
        lines += ["", "## Per-linear output error (dummy model, every decoder layer)", "",
                  "Relative error ||y - y_exact|| / ||y_exact|| against the fp32 product, "
                  "unit-normal bf16 inputs; median (max) over the layers.", "",
                  "| linear x rows | " + " | ".join(methods) + " |",
                  "|---|" + "---|" * len(methods)]
        for key, per in acc["per_linear"].items():
            lines.append(f"| {key} | " + " | ".join(
                f"{per[m]['median']:.2e} ({per[m]['max']:.2e})" for m in methods) + " |")
    if acc.get("tiny_model"):
        lines += ["", "## Tiny real-architecture model (GlmForCausalLM layout, random weights)",
                  "", "| method | teacher-forced top-1 vs bf16 | logits rel error | greedy tokens "
                  "equal | first difference per prompt |", "|---|---|---|---|---|"]
        for m, r in acc["tiny_model"].items():
            lines.append(f"| {m} | {r['top1_agreement']:.3f} ({r['positions']} positions) | "
                         f"{r['logits_rel_error']:.4f} | {r['greedy_same']} / "
                         f"{r['greedy_total']} | {r['greedy_first_difference']} |")
    if "error" in acc:
        lines.append(f"\naccuracy part failed: {acc['error'][:300]}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="glm-4-9b")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--part", default="all",
                    choices=["all", *METHODS, "accuracy", "report"])
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m for m in a.methods.split(",") if m]
    if a.quick and a.model == "glm-4-9b":
        a.model = tiny_checkpoint(out / "tiny")
    if a.part in (*METHODS, "accuracy"):
        try:
            res = (run_accuracy(a.model, methods, a.quick) if a.part == "accuracy"
                   else run_speed(a.model, a.part, a.quick))
        except Exception as e:  # noqa: BLE001 - report it, keep the other parts
            import traceback

            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        (out / f"part_{a.part}.json").write_text(json.dumps(res, indent=1))
        return
    device_file = out / "device.json"
    if CUDA and not device_file.exists():
        from bench_gpu import measure_device

        device_file.write_text(json.dumps(measure_device()))
        torch.cuda.empty_cache()
    device = json.loads(device_file.read_text()) if device_file.exists() else {}
    if a.part == "all":
        for part in [*methods, "accuracy"]:
            cmd = [sys.executable, __file__, "--out", str(out), "--model", a.model, "--part",
                   part, "--methods", ",".join(methods)] + (["--quick"] if a.quick else [])
            try:
                subprocess.run(cmd, check=False, env=os.environ, timeout=300)
            except subprocess.TimeoutExpired:
                print(f"{part} part stopped after 300 s", flush=True)
    parts = {}
    for m in methods:
        f = out / f"part_{m}.json"
        parts[m] = json.loads(f.read_text()) if f.exists() else {"error": "no result"}
    f = out / "part_accuracy.json"
    acc = json.loads(f.read_text()) if f.exists() else {"error": "no result"}
    cmd = (f"python benchmarks/bench_quant.py --out DIR --model {Path(a.model).name} "
           f"--methods {','.join(methods)}" + (" --quick" if a.quick else ""))
    data = {"device": device, "speed": parts, "accuracy": acc, "command": cmd}
    (out / "bench_quant.json").write_text(json.dumps(data, indent=1))
    (out / "bench_quant.md").write_text(report(device, parts, acc, cmd, Path(a.model).name))
    print((out / "bench_quant.md").read_text())


if __name__ == "__main__":
    main()
