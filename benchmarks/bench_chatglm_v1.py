"""GPU benchmark of ChatGLM-6B v1 (`chatglm-6b` preset, dummy weights, fp16 as shipped).

    python benchmarks/bench_chatglm_v1.py --out DIR

Decode step time at batch 1 and 32 with 512 tokens of context (steady state: the interval
between engine steps, CUDA graphs on), with MBU = (weight bytes read + KV bytes read) / step /
measured copy bandwidth; and the prefill of prefix-LM prompts (each prompt's context in one
step: 8 x 512 and 1 x 1900 tokens) with MFU = 2 x params x tokens / time / measured fp16-class
matmul rate. Writes DIR/bench_chatglm_v1.md and .json.
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

from bench_gpu import measure_device, sync  # noqa: E402 - beside this file
from decode_timing import steady_decode  # noqa: E402


def run(dtype: str, model: str = "chatglm-6b", device: str = "auto") -> dict:
    from flatout import LLM, SamplingParams
    from flatout.engine.messages import EngineCoreRequest

    t0 = time.monotonic()
    llm = LLM(model, load_format="dummy", dtype=dtype, max_model_len=2048, device=device,
              max_num_seqs=64, max_num_batched_tokens=4096, enable_prefix_caching=False)
    core = llm.engine.core
    cfg = core.model_config
    gmask, sop = cfg.mask_token_ids[0], cfg.bos_token_id
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:  # text, then [gMASK] <sop>
        text = torch.randint(4, cfg.vocab_size // 2, (n - 2,), generator=gen).tolist()
        return text + [gmask, sop]

    def add(rid: str, n_prompt: int, n_out: int) -> None:
        p = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        core.add_request(EngineCoreRequest(rid, prompt(n_prompt), p, n_out))

    embed = cfg.vocab_size * cfg.hidden_size  # gathered, not read, each step
    res: dict = {"startup_s": time.monotonic() - t0, "dtype": cfg.dtype,
                 "weight_bytes_read": cfg.weight_bytes - embed * cfg.dtype_bytes,
                 "kv_bytes_per_token": cfg.kv_bytes_per_token, "num_params": cfg.num_params,
                 "cuda_graphs": core.runner.graphs is not None}
    decode = []
    for bs in (1, 32):
        for i in range(bs):
            add(f"d{bs}-{i}", 512, 48)
        timing = steady_decode(core)
        kv_read = bs * 536 * cfg.kv_bytes_per_token
        decode.append({"batch": bs, **timing, "bytes": res["weight_bytes_read"] + kv_read})
    res["decode"] = decode
    prefill = []
    for n, length in [(8, 512), (1, 1900)]:
        times = []
        for rep in range(3):
            for i in range(n):
                add(f"p{n}-{rep}-{i}", length, 1)
            sync()
            t = time.perf_counter()
            while core.has_unfinished():
                core.step()
            sync()
            times.append(time.perf_counter() - t)
        prefill.append({"shape": f"{n} x {length}", "tokens": n * length, "s": min(times)})
    res["prefill"] = prefill
    return res


def report(device: dict, res: dict, cmd: str) -> str:
    bw, peak = device["copy_bandwidth_Bps"], device["bf16_matmul_flops"]
    lines = [f"# ChatGLM-6B v1 (chatglm-6b, dummy weights, {res['dtype']}) on {device['name']}",
             "", f"`{cmd}`", "",
             f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s; "
             f"weights read per step {res['weight_bytes_read'] / 1e9:.2f} GB, "
             f"KV {res['kv_bytes_per_token'] / 1024:.0f} KiB/token; "
             f"CUDA graphs {'on' if res['cuda_graphs'] else 'off'}", "",
             "| decode batch (ctx 512) | step ms | floor ms | MBU | engine busy |",
             "|---:|---:|---:|---:|---:|"]
    for d in res["decode"]:
        floor = d["bytes"] / bw * 1e3
        lines.append(f"| {d['batch']} | {d['step_ms']:.2f} | {floor:.2f} | "
                     f"{floor / d['step_ms']:.0%} | {d['gpu_busy_events']:.0%} |")
    lines += ["", "| prefill (prefix-LM, whole context per step) | s | tokens/s | MFU |",
              "|---|---:|---:|---:|"]
    for p in res["prefill"]:
        flops = 2 * res["num_params"] * p["tokens"]
        lines.append(f"| {p['shape']} | {p['s']:.3f} | {p['tokens'] / p['s']:,.0f} | "
                     f"{flops / p['s'] / peak:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="float16", help="float16 (as shipped) or bfloat16")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = measure_device()
    torch.cuda.empty_cache()
    res = run(a.dtype)
    cmd = f"python benchmarks/bench_chatglm_v1.py --out DIR --dtype {a.dtype}"
    (out / "bench_chatglm_v1.json").write_text(json.dumps({"device": device, **res}, indent=1))
    (out / "bench_chatglm_v1.md").write_text(report(device, res, cmd))
    print((out / "bench_chatglm_v1.md").read_text())


if __name__ == "__main__":
    main()
