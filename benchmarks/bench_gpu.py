"""GPU benchmark: flatout against the HBM floor and the matmul peak, beside transformers.

    python benchmarks/bench_gpu.py --out DIR [--model glm-4-9b] [--quick]

Runs in one go on the device, each engine in a process of its own (so their memory never meets):
  1. the device: copy bandwidth and bf16 matmul rate, measured;
  2. flatout: decode step time at batch 1..256 with 512 tokens of context (MBU against the floor
     of weight bytes + KV bytes read per step / copy bandwidth), prefill of 8 x 512 and 1 x 4096
     tokens (MFU), and the seed workloads 32 and 256 requests x (512 -> 256 tokens, ignore_eos):
     output tokens/s, requests/s, GPU busy fraction (CUDA-event time of forwards / wall) beside
     NVML utilization;
  3. transformers on the same model and workload: `generate` (padded batch) and `generate_batch`
     (continuous batching, attn_implementation "paged|sdpa").
Writes DIR/bench_gpu.json and DIR/bench_gpu.md (the tables and the command). The parts can
also run one at a time (`--part flatout`, `--part transformers`, then `--part report`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode_timing import profile_decode, steady_decode  # noqa: E402 - beside this file


# -- device --------------------------------------------------------------------------------
def measure_device() -> dict:
    dev = torch.device("cuda")
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        b.copy_(a)
    e.record()
    torch.cuda.synchronize()
    copy_bw = 2 * n * 20 / (s.elapsed_time(e) / 1e3)  # bytes read + written per second
    del a, b
    m = 8192
    x = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
    y = torch.randn(m, m, dtype=torch.bfloat16, device=dev)
    for _ in range(3):
        x @ y
    torch.cuda.synchronize()
    s.record()
    for _ in range(20):
        x @ y
    e.record()
    torch.cuda.synchronize()
    flops = 2 * m**3 * 20 / (s.elapsed_time(e) / 1e3)
    return {
        "name": torch.cuda.get_device_name(dev),
        "copy_bandwidth_Bps": copy_bw,
        "bf16_matmul_flops": flops,
        "torch": torch.__version__,
    }


class NvmlSampler:
    """NVML GPU utilization every 100 ms while running."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
            self._nvml = pynvml
        except Exception:  # noqa: BLE001 - NVML is optional
            self._nvml = None

    def __enter__(self) -> NvmlSampler:
        if self._nvml is not None:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._h).gpu)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return statistics.mean(self.samples) if self.samples else None


# -- flatout -------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_flatout(model: str, quick: bool) -> dict:
    from flatout import LLM, SamplingParams
    from flatout.engine.messages import EngineCoreRequest

    t0 = time.monotonic()
    llm = LLM(model, load_format="dummy", max_model_len=2048 if quick else 8192, max_num_seqs=256,
              max_num_batched_tokens=8192, enable_prefix_caching=False)
    core = llm.engine.core
    cfg = core.model_config
    res: dict = {"startup_s": time.monotonic() - t0, "num_kv_blocks": core.cache_config.num_blocks,
                 "weight_bytes": cfg.weight_bytes, "kv_bytes_per_token": cfg.kv_bytes_per_token,
                 "num_params": cfg.num_params, "cuda_graphs": core.runner.graphs is not None,
                 "embed_params": cfg.vocab_size * cfg.hidden_size
                 * (1 if cfg.tie_word_embeddings else 2)}
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(0)

    def prompt(n: int) -> list[int]:
        return torch.randint(100, vocab - 100, (n,), generator=gen).tolist()

    def add(rid: str, n_prompt: int, n_out: int) -> None:
        p = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        core.add_request(EngineCoreRequest(rid, prompt(n_prompt), p, n_out))

    # decode step time at context 512 (steady state: the interval between steps), and a
    # profile of the steps at batch 1 and 32 (kernel-busy fraction, where the time goes)
    decode, profiles = [], {}
    for bs in [1, 8] if quick else [1, 8, 32, 64, 128, 256]:
        for i in range(bs):
            add(f"d{bs}-{i}", 512, 40)
        timing = steady_decode(core)
        kv_read = bs * 530 * cfg.kv_bytes_per_token
        decode.append({"batch": bs, **timing, "bytes": cfg.weight_bytes + kv_read})
        if bs in (1, 8 if quick else 32):
            for i in range(bs):
                add(f"prof{bs}-{i}", 512, 40)
            profiles[bs] = profile_decode(core)
            profiles[bs]["unprofiled_step_ms"] = timing["step_ms"]
    res["decode"] = decode
    res["profiles"] = profiles

    # prefill
    prefill = []
    for n, length in [(2, 64)] if quick else [(8, 512), (1, 4096)]:
        for rep in range(3):
            for i in range(n):
                add(f"p{n}-{rep}-{i}", length, 1)
            sync()
            t = time.perf_counter()
            while core.has_unfinished():
                core.step()
            el = time.perf_counter() - t
        prefill.append({"shape": f"{n} x {length}", "tokens": n * length, "s": el})
    res["prefill"] = prefill

    # the seed workloads through the offline API
    workloads = []
    for num in [4] if quick else [32, 256]:
        prompts = [prompt(128 if quick else 512) for _ in range(num)]
        params = SamplingParams(temperature=0.0, max_tokens=16 if quick else 256, ignore_eos=True)
        core.runner.reset_busy_time()
        with NvmlSampler() as nv:
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            wall = time.perf_counter() - t
        n_out = sum(len(o.token_ids) for o in outs)
        workloads.append({
            "requests": num, "wall_s": wall, "output_tok_s": n_out / wall, "req_s": num / wall,
            "gpu_busy": core.runner.busy_time() / wall, "nvml_util": nv.mean,
        })
    res["workloads"] = workloads
    return res


# -- transformers --------------------------------------------------------------------------
def run_transformers(model: str, quick: bool, partial: Path | None = None) -> dict:
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    from flatout.models.registry import resolve_model_config

    cfg = resolve_model_config(model, dtype="bfloat16", device_type="cuda", load_format="dummy")
    hf_cfg = transformers.AutoConfig.for_model(**_hf_config_for(cfg))
    res: dict = {"transformers": transformers.__version__}
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    for num in [32] if quick else [32, 256]:
        prompts = [torch.randint(100, vocab - 100, (512,), generator=gen).tolist()
                   for _ in range(num)]
        for impl in ["sdpa", "paged|sdpa"]:
            key = f"{'generate' if impl == 'sdpa' else 'generate_batch'}[{impl}] x{num}"
            if impl == "sdpa" and num > 32:
                continue  # a padded batch of 256 x 768 is not how anyone runs it
            m = None
            try:
                with torch.device("cuda"):  # random init on the GPU, not 9 B params on the CPU
                    m = AutoModelForCausalLM.from_config(
                        hf_cfg, dtype=torch.bfloat16, attn_implementation=impl
                    ).eval()
                gen_cfg = GenerationConfig(max_new_tokens=256, min_new_tokens=256, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)
                # no_grad, not inference_mode: generate_batch's worker thread updates its own
                # static tensors in place, which inference tensors would refuse
                with NvmlSampler() as nv, torch.no_grad():
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    if impl == "sdpa":
                        ids = torch.tensor(prompts, device="cuda")
                        out = m.generate(ids, attention_mask=torch.ones_like(ids),
                                         generation_config=gen_cfg)
                        n_out = (out.shape[1] - 512) * num
                    else:
                        outs = m.generate_batch(inputs=prompts, generation_config=gen_cfg)
                        n_out = sum(len(o.generated_tokens) for o in outs.values())
                    torch.cuda.synchronize()
                    wall = time.perf_counter() - t
                if n_out < num * 256:
                    raise RuntimeError(f"only {n_out} of {num * 256} tokens generated")
                res[key] = {"wall_s": wall, "output_tok_s": n_out / wall, "req_s": num / wall,
                            "nvml_util": nv.mean}
            except Exception as e:  # noqa: BLE001 - report, don't abort the whole run
                res[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            finally:
                del m
                gc.collect()
                torch.cuda.empty_cache()
            if partial is not None:  # results so far survive a timeout of this part
                partial.write_text(json.dumps(res, indent=1))
    return res


def _hf_config_for(cfg) -> dict:  # noqa: ANN001
    d = dict(cfg.hf_config)
    d.setdefault("model_type", {"GlmForCausalLM": "glm", "Glm4ForCausalLM": "glm4",
                                "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                                "Qwen3ForCausalLM": "qwen3"}[cfg.architecture])
    return d


# -- report --------------------------------------------------------------------------------
def report(device: dict, fo: dict, hf: dict, cmd: str) -> str:
    bw, peak = device["copy_bandwidth_Bps"], device["bf16_matmul_flops"]
    lines = [f"# flatout GPU benchmark: {fo.get('model', '')}", "",
             f"Command: `{cmd}`", "",
             f"Device: {device['name']}, torch {device['torch']}; measured copy bandwidth "
             f"{bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s.", ""]
    if "error" in fo:
        return "\n".join(lines + [f"flatout failed: {fo['error']}"])
    lines += [f"Weights {fo['weight_bytes'] / 1e9:.2f} GB; KV cache {fo['num_kv_blocks']} blocks; "
              f"CUDA graphs: {fo['cuda_graphs']}; startup {fo['startup_s']:.0f} s.", "",
              "## Decode step (context ~512)", "",
              "| batch | step ms | floor ms | MBU | GPU busy (events) |", "|---|---|---|---|---|"]
    for d in fo["decode"]:
        floor = d["bytes"] / bw * 1e3
        lines.append(f"| {d['batch']} | {d['step_ms']:.2f} | {floor:.2f} | "
                     f"{floor / d['step_ms']:.0%} | {d.get('gpu_busy_events', 0):.0%} |")
    for bs, prof in fo.get("profiles", {}).items():
        lines += ["", f"### Profile of {prof['steps']} decode steps at batch {bs}", "",
                  f"Wall {prof['wall_ms_per_step']:.2f} ms/step under the profiler; kernels "
                  f"(union of kernel/memcpy/memset intervals) {prof['kernel_ms_per_step']:.2f} "
                  f"ms/step = {prof['kernel_busy_of_wall']:.1%} of the wall time under the "
                  f"profiler, {prof['kernel_ms_per_step'] / prof['unprofiled_step_ms']:.1%} of "
                  f"the unprofiled step ({prof['unprofiled_step_ms']:.2f} ms).", "",
                  "| kernel | ms/step |", "|---|---|"]
        for k in prof["top_kernels"]:
            name = k["name"].replace("|", "/")
            lines.append(f"| `{name}` | {k['ms_per_step']:.3f} |")
    lines += ["", "## Prefill", "", "| batch | ms | MFU |", "|---|---|---|"]
    # matmul FLOPs of a prefill: 2 x (parameters outside the embedding and LM head) per token
    dense = fo["num_params"] - fo["embed_params"]
    for p in fo["prefill"]:
        mfu = 2 * dense * p["tokens"] / p["s"] / peak
        lines.append(f"| {p['shape']} | {p['s'] * 1e3:.1f} | {mfu:.0%} |")
    lines += ["", "## Workload: N requests x (512 prompt -> 256 output tokens, ignore_eos)", "",
              "| engine | requests | output tok/s | req/s | GPU busy (events) | NVML util |",
              "|---|---|---|---|---|---|"]
    for w in fo["workloads"]:
        nv = f"{w['nvml_util']:.0f} %" if w["nvml_util"] is not None else "n/a"
        lines.append(f"| flatout | {w['requests']} | {w['output_tok_s']:.0f} | "
                     f"{w['req_s']:.2f} | {w['gpu_busy']:.0%} | {nv} |")
    for key, r in hf.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            lines.append(f"| transformers {key} | | failed: {r['error'][:120]} | | | |")
            continue
        nv = f"{r['nvml_util']:.0f} %" if r["nvml_util"] is not None else "n/a"
        lines.append(f"| transformers {key} | | {r['output_tok_s']:.0f} | {r['req_s']:.2f} | "
                     f"| {nv} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="glm-4-9b")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--part", choices=["all", "flatout", "transformers", "report"],
                    default="all", help="all: both engines, each in its own process, then the "
                    "report; report: the report from the parts already in --out")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.part in ("flatout", "transformers"):
        try:
            if a.part == "flatout":
                res = run_flatout(a.model, a.quick)
            else:
                res = run_transformers(a.model, a.quick, out / "part_transformers.json")
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        res["model"] = a.model
        (out / f"part_{a.part}.json").write_text(json.dumps(res, indent=1))
        return
    device_file = out / "device.json"
    if not device_file.exists():
        device_file.write_text(json.dumps(measure_device()))
    device = json.loads(device_file.read_text())
    torch.cuda.empty_cache()
    if a.part == "all":
        for part, limit in [("flatout", 330), ("transformers", 260)]:
            cmd = [sys.executable, __file__, "--out", str(out), "--model", a.model, "--part",
                   part]
            try:
                subprocess.run(cmd + (["--quick"] if a.quick else []), check=False,
                               env=os.environ, timeout=limit)
            except subprocess.TimeoutExpired:
                print(f"{part} part stopped after {limit} s", flush=True)
    parts = {}
    for part in ["flatout", "transformers"]:
        f = out / f"part_{part}.json"
        parts[part] = json.loads(f.read_text()) if f.exists() else {"error": "no result"}
    fo, hf = parts["flatout"], parts["transformers"]
    cmd = "python benchmarks/bench_gpu.py --out DIR --model " + a.model + (
        " --quick" if a.quick else "")
    data = {"device": device, "flatout": fo, "transformers": hf, "command": cmd}
    (out / "bench_gpu.json").write_text(json.dumps(data, indent=1))
    (out / "bench_gpu.md").write_text(report(device, fo, hf, cmd))
    print((out / "bench_gpu.md").read_text())


if __name__ == "__main__":
    main()
