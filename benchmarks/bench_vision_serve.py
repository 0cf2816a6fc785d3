"""The agent-like vision workload over HTTP on one GPU, beside transformers at its best, in one
command (issue 14): every request one 1080x2400 PNG screenshot plus ~200 text tokens -> 128 output
tokens, at 16 and 64 concurrent clients.

    python benchmarks/bench_vision_serve.py --out benchmarks/results/vision_serve_h200
    python benchmarks/bench_vision_serve.py --quick --out /tmp/vs   # tiny, on the CPU

Three parts, one after the other (each alone on the GPU), written to DIR/bench_vision_serve.md
and DIR/bench_vision_serve.json (the bench's own JSON per load point beside them):

1. flatout over HTTP: `flatout serve --load-format dummy` on a free port, `flatout bench --api
   chat --image-size 1080x2400 --images-per-request 1` at each --concurrency, the server
   stopped after. Reported: req/s, TTFT and TPOT mean / P99, GPU utilization (NVML), engine busy.
2. transformers: `Glm4vForConditionalGeneration` of the same config with random weights (bf16 on
   the GPU, sdpa attention), batched `generate` (greedy, exactly 128 new tokens) over the same
   kind of screenshots, images preprocessed by transformers' `Glm4vImageProcessor` (its torch
   backend on the GPU, `device="cuda"`; without torchvision transformers falls back to its
   Pillow + numpy backend on the CPU, and the table says which ran), at growing batch sizes
   under a time cap (--hf-time-budget, shrunk to fit --time-limit). Its req/s times `generate`
   alone, preprocessing off the clock (its best case; a column adds it back); the best batch
   size's req/s is the baseline.
3. flatout's image decoder on the API side: base64 data URL -> uint8 pixels (`data_url_bytes` +
   `decode_image`, what the server's decode pool runs per image) with 1 and 8 threads, images/s.

The model: chat requests need a tokenizer and a chat template and the `autoglm-phone-9b` preset
(dummy weights) has neither; no GLM tokenizer is available offline. So the served checkpoint is a
folder written here: the preset's config.json (GLM-4.1V-9B shapes: 40-layer 4096-wide M-RoPE
decoder, 24-block vision tower) with the demo-vl tokenizer and chat template, and the numbers that
name tokens taken from demo-vl: the text vocabulary (4,104 ids instead of 151,552, so the LM head
is 4104x4096 instead of 151552x4096, which makes a decode step read ~1.2 GB less of its ~19 GB) and
the image / stop token ids. With 151,552 ids a random-weight model writes ids that tokenizer cannot
decode, and the load tester times tokens by the text they stream. Both sides run this same config.
With --model PATH (a real checkpoint folder, its own tokenizer) the folder is served as it is.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatout.bench.images import ImageSpec, data_url, screenshot  # noqa: E402
from flatout.multimodal.image_io import data_url_bytes, decode_image  # noqa: E402
from flatout.multimodal.image_size import image_grid  # noqa: E402

BANNER = re.compile(r"serving '([^']*)' on (http://\S+) ")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "generation_config.json")
# what names tokens: the tokenizer's, so the demo-vl tokenizer's ids
TOKEN_ID_KEYS = ("image_start_token_id", "image_token_id", "image_end_token_id",
                 "video_start_token_id", "video_end_token_id", "video_token_id")


def build_checkpoint(base: dict[str, Any], folder: Path) -> Path:
    """`base` (a GLM-4.1V config.json) with demo-vl's tokenizer, template, vocabulary and
    token ids, as a folder to serve with --load-format dummy."""
    from flatout.demo_vl import DEMO_VL_CONFIG, demo_vl_model_path

    demo = demo_vl_model_path()
    cfg = json.loads(json.dumps(base))
    for key in TOKEN_ID_KEYS:
        cfg[key] = DEMO_VL_CONFIG[key]
    for key in ("vocab_size", "eos_token_id", "pad_token_id"):
        cfg["text_config"][key] = DEMO_VL_CONFIG["text_config"][key]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy(Path(demo) / name, folder / name)
    return folder


class Server:
    """`flatout serve` as a child process on a free port."""

    def __init__(self, args: list[str], log: Path, timeout: float, cpu: bool = False) -> None:
        self.log_path = log
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})}  # cpu: no GPU seen
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flatout.cli", "serve", "--port", "0", *args],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
            start_new_session=True)
        deadline = time.monotonic() + timeout
        self.url = ""
        while time.monotonic() < deadline:
            m = BANNER.search(log.read_text())
            if m and not self.url:
                self.url = m.group(2)
            if self.url and self._healthy():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"flatout serve did not become healthy:\n{log.read_text()[-4000:]}")

    def _healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """SIGTERM, then wait until the server and the engine core it started (its process
        group: the GPU's memory is free after) are gone; SIGKILL what is left after 60 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.proc.poll()
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        self.log.close()


def bench_row(conc: int, n: int, run: dict[str, Any], json_name: str) -> dict[str, Any]:
    """What the table reports of one `flatout bench` load point."""
    s, gpu, eng = run["summary"], run.get("gpu") or {}, run.get("engine") or {}
    busy = eng.get("busy_perc")
    return {
        "concurrency": conc, "num_prompts": n, "completed": s["completed"],
        "failed": s["failed"], "duration_s": s["duration_s"],
        "req_per_s": s["request_throughput"], "output_tok_per_s": s["output_throughput"],
        "mean_prompt_tokens": s["total_input_tokens"] / max(1, s["completed"]),
        "ttft_ms": {"mean": s["ttft_ms"]["mean"], "p99": s["ttft_ms"]["p99"]},
        "tpot_ms": {"mean": s["tpot_ms"]["mean"], "p99": s["tpot_ms"]["p99"]},
        "gpu_util_perc": gpu.get("util_mean"), "gpu_source": gpu.get("source"),
        "engine_busy_perc": None if busy is None else 100 * busy,
        "client_loop_cpu_perc": 100 * (run.get("client") or {}).get("loop_cpu_perc", 0.0),
        "bench_json": json_name}


def serve_part(a: argparse.Namespace, model: str, tokenizer: str, out: Path) -> list[dict]:
    serve_args = ["--model", model, "--load-format", a.load_format,
                  "--max-model-len", str(a.max_model_len),
                  "--mm-processor-kwargs", json.dumps({"max_pixels": a.max_pixels}),
                  *a.serve_args]
    server = Server(serve_args, out / "serve.log", a.startup_timeout, cpu=a.quick)
    rows = []
    try:
        # one `flatout bench` per point, each with its own seed: no point sees another's
        # images (which prefix caching would hit)
        for conc, n in zip(a.concurrency, a.num_prompts, strict=True):
            path = out / f"bench_c{conc}.json"
            cmd = [sys.executable, "-m", "flatout.cli", "bench", "--base-url", server.url,
                   "--api", "chat", "--tokenizer", tokenizer, "--image-size", a.image_size,
                   "--images-per-request", "1", "--input-len", str(a.text_tokens),
                   "--output-len", str(a.output_tokens), "--concurrency", str(conc),
                   "--num-prompts", str(n), "--seed", str(conc), "--no-progress",
                   "--timeout", str(a.request_timeout), "--json", str(path)]
            try:
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                                      timeout=a.bench_timeout,
                                      env={**os.environ, "COLUMNS": "160"})
            except subprocess.TimeoutExpired:
                rows.append({"concurrency": conc, "num_prompts": n,
                             "error": f"flatout bench ran past --bench-timeout {a.bench_timeout}"})
                continue
            (out / f"bench_c{conc}.txt").write_text(done.stdout + done.stderr)
            if not path.is_file():
                raise RuntimeError(f"flatout bench failed:\n{done.stdout}\n{done.stderr}")
            rows.append(bench_row(conc, n, json.loads(path.read_text())["runs"][0], path.name))
    finally:
        server.stop()
    return rows


def hf_part(a: argparse.Namespace, cfg_dict: dict[str, Any], device: str) -> dict[str, Any]:
    """transformers' batched generate at growing batch sizes, under a time cap."""
    import torch
    import transformers
    from PIL import Image

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = transformers.Glm4vConfig(**cfg_dict)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        model = transformers.Glm4vForConditionalGeneration._from_config(cfg, dtype=dtype)
    model.eval()
    init_s = time.perf_counter() - t
    # transformers' default backend is torch (on `device`); without torchvision it falls back to
    # Pillow + numpy on the CPU, which is then what it runs
    proc = transformers.Glm4vImageProcessor(
        size={"shortest_edge": 112 * 112, "longest_edge": a.max_pixels})
    on_cpu = "Pil" in type(proc).__name__
    proc_kwargs = {} if on_cpu else {"device": device}
    proc_desc = (f"{type(proc).__name__} (" + ("Pillow + numpy on the CPU: torchvision is not "
                 "installed" if on_cpu else f"torch on {device}") + ")")
    spec = ImageSpec.parse(a.image_size)
    rng = np.random.default_rng(0)
    vocab = int(cfg_dict["text_config"]["vocab_size"])
    low = 10
    high = min(vocab, int(cfg_dict["image_start_token_id"])) - 1
    seen = 0

    def inputs(batch: int) -> dict[str, Any]:
        nonlocal seen
        with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:  # not on the clock
            pil = list(pool.map(lambda i: Image.open(io.BytesIO(screenshot(spec, 7, i)))
                                .convert("RGB"), range(seen, seen + batch)))
        seen += batch
        t0 = time.perf_counter()
        px = proc(images=pil, return_tensors="pt", **proc_kwargs)
        grid = px["image_grid_thw"]
        n_img = int(grid[0].prod()) // int(cfg_dict["vision_config"]["spatial_merge_size"]) ** 2
        rows = []
        for _ in range(batch):
            text = rng.integers(low, high, a.text_tokens).tolist()
            rows.append([*text[:10], cfg_dict["image_start_token_id"],
                         *[cfg_dict["image_token_id"]] * n_img,
                         cfg_dict["image_end_token_id"], *text[10:]])
        ids = torch.tensor(rows, device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "pixel_values": px["pixel_values"].to(device=device, dtype=dtype),
                "image_grid_thw": grid.to(device), "preprocess_s": time.perf_counter() - t0,
                "image_tokens": n_img}

    def generate(batch: int, new_tokens: int) -> tuple[float, dict[str, Any]]:
        x = inputs(batch)
        meta = {"preprocess_s": x.pop("preprocess_s"), "image_tokens": x.pop("image_tokens"),
                "prompt_tokens": int(x["input_ids"].shape[1])}
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**x, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False)
        if device == "cuda":
            torch.cuda.synchronize()
        meta["new_tokens"] = int(out.shape[1] - x["input_ids"].shape[1])
        return time.perf_counter() - t0, meta

    generate(1, 2)  # warm-up
    runs: list[dict[str, Any]] = []
    budget = a.hf_time_budget
    spent = 0.0
    for batch in a.hf_batches:
        if runs:  # generate's time grows at least as fast as the batch: stop before the cap
            last = runs[-1]
            if spent + last["seconds"] * batch / last["batch"] > budget:
                runs.append({"batch": batch, "skipped": "would pass --hf-time-budget"})
                break
        try:
            sec, meta = generate(batch, a.output_tokens)
        except torch.OutOfMemoryError:
            runs.append({"batch": batch, "skipped": "out of GPU memory"})
            torch.cuda.empty_cache()
            break
        spent += sec
        with_pre = sec + meta["preprocess_s"]
        runs.append({"batch": batch, "seconds": sec, "req_per_s": batch / sec,
                     "req_per_s_with_preprocess": batch / with_pre, **meta})
        print(f"transformers batch {batch}: generate {sec:.2f} s ({batch / sec:.3f} req/s), "
              f"preprocessing {meta['preprocess_s']:.2f} s", flush=True)
    done = [r for r in runs if "req_per_s" in r]
    best = max(done, key=lambda r: r["req_per_s"]) if done else None
    return {"init_s": init_s, "dtype": str(dtype).removeprefix("torch."),
            "transformers": transformers.__version__, "attn": "sdpa",
            "processor": proc_desc,
            "runs": runs, "best": best, "time_budget_s": budget}


def decode_part(a: argparse.Namespace) -> dict[str, Any]:
    """flatout's API-side decoder: data URL -> [H, W, 3] uint8, images/s per thread count."""
    spec = ImageSpec.parse(a.decode_image_size)
    with ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        urls = list(pool.map(lambda i: data_url(screenshot(spec, 3, i), "png"),
                             range(a.decode_images)))
    sizes = [len(data_url_bytes(u)) for u in urls]

    def one(url: str) -> int:
        return int(decode_image(data_url_bytes(url)).shape[0])

    one(urls[0])
    out: dict[str, Any] = {"image_size": a.decode_image_size, "images": len(urls),
                           "mean_png_kb": float(np.mean(sizes)) / 1e3,
                           "cpu_count": os.cpu_count(), "threads": {}}
    for threads in a.decode_threads:
        with ThreadPoolExecutor(threads) as pool:
            t = time.perf_counter()
            list(pool.map(one, urls))
            sec = time.perf_counter() - t
        out["threads"][str(threads)] = {"seconds": sec, "images_per_s": len(urls) / sec}
    return out


def fmt(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = [f"# Agent-like vision workload over HTTP ({result['model_label']}, "
             f"{result['device']})", "", f"`{result['command']}`", "",
             f"Each request: one {a['image_size']} PNG screenshot (max_pixels {a['max_pixels']}: "
             f"{result['image_tokens']} image tokens) + {a['text_tokens']} text tokens -> "
             f"{a['output_tokens']} output tokens (ignore_eos), streamed chat completions.", "",
             "| system | clients | req/s | TTFT mean / P99 ms | TPOT mean / P99 ms | GPU util % "
             "| engine busy % |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["flatout"]:
        if "error" in r:
            lines.append(f"| flatout | {r['concurrency']} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| flatout | {r['concurrency']} | {r['req_per_s']:.2f} | {fmt(r['ttft_ms']['mean'])}"
            f" / {fmt(r['ttft_ms']['p99'])} | {fmt(r['tpot_ms']['mean'], 2)} / "
            f"{fmt(r['tpot_ms']['p99'], 2)} | {fmt(r['gpu_util_perc'])} | "
            f"{fmt(r['engine_busy_perc'])} |")
    hf = result.get("transformers")
    if hf and hf.get("error"):
        lines += ["", f"transformers failed: `{hf['error']}`"]
    elif hf and hf["best"]:
        b = hf["best"]
        lines.append(f"| transformers {hf['transformers']} batched generate (best: batch "
                     f"{b['batch']}) | {b['batch']} | {b['req_per_s']:.3f} | | | | |")
        ok = [r for r in result["flatout"] if "error" not in r]
        ratios = ", ".join(f"{r['req_per_s'] / b['req_per_s']:.1f}x at {r['concurrency']} "
                           "clients" for r in ok)
        busy = [r["engine_busy_perc"] for r in ok]
        busy_text = ", ".join(fmt(v) for v in busy)
        lines += ["", f"flatout / transformers at its best (requests/s): **{ratios}** (target "
                  f">= 10x); engine busy {busy_text} % (target >= 90 %).", "",
                  f"transformers: `Glm4vForConditionalGeneration`, random weights, {hf['dtype']}, "
                  f"{hf['attn']} attention, greedy `generate` of exactly {a['output_tokens']} "
                  f"tokens per request; images preprocessed by {hf['processor']}. Its req/s "
                  "counts `generate` alone (the preprocessing off the clock: its best case); "
                  "the last column puts the preprocessing back. Batch sizes tried under a "
                  f"{hf['time_budget_s']:.0f} s cap:", "",
                  "| batch | generate s | preprocessing s | req/s | req/s with preprocessing |",
                  "|---:|---:|---:|---:|---:|"]
        for r in hf["runs"]:
            if "req_per_s" in r:
                lines.append(f"| {r['batch']} | {r['seconds']:.2f} | {r['preprocess_s']:.3f} | "
                             f"{r['req_per_s']:.3f} | {r['req_per_s_with_preprocess']:.3f} |")
            else:
                lines.append(f"| {r['batch']} | {r['skipped']} | | | |")
    d = result["decode"]
    lines += ["", f"Image decode in the API process (data URL -> uint8 pixels, flatout's "
              f"decoder, {d['images']} PNGs of {d['image_size']}, {d['mean_png_kb']:.0f} KB "
              f"each on average, {d['cpu_count']} CPUs):", "", "| threads | images/s |",
              "|---:|---:|"]
    for k, v in d["threads"].items():
        lines.append(f"| {k} | {v['images_per_s']:.1f} |")
    lines += ["", result["model_note"], ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the markdown, JSON and logs")
    ap.add_argument("--quick", action="store_true",
                    help="tiny scale on the CPU (demo-vl shapes) to test the script itself")
    ap.add_argument("--model", default=None, help="a checkpoint folder with its tokenizer "
                    "(default: autoglm-phone-9b shapes with the demo-vl tokenizer, see above)")
    ap.add_argument("--load-format", default="dummy")
    ap.add_argument("--image-size", default="1080x2400")
    ap.add_argument("--max-pixels", type=int, default=5_000_000)
    ap.add_argument("--text-tokens", type=int, default=200)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--num-prompts", type=int, nargs="+", default=[64, 192],
                    help="requests per concurrency (one per --concurrency value)")
    ap.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[],
                    help="more `flatout serve` flags (last on the line)")
    ap.add_argument("--hf-batches", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    ap.add_argument("--hf-time-budget", type=float, default=150.0,
                    help="seconds of transformers generate in all")
    ap.add_argument("--time-limit", type=float, default=510.0,
                    help="seconds for the whole script: the transformers cap shrinks to fit")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--decode-image-size", default="1080x2400")
    ap.add_argument("--decode-images", type=int, default=32)
    ap.add_argument("--decode-threads", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--startup-timeout", type=float, default=240.0)
    ap.add_argument("--bench-timeout", type=float, default=240.0, help="per load point (s)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    a = ap.parse_args()
    if a.quick:
        a.image_size, a.decode_image_size, a.max_pixels = "112x224", "540x1200", 50_176
        a.text_tokens, a.output_tokens, a.max_model_len = 16, 4, 512
        a.concurrency, a.num_prompts, a.hf_batches = [2, 4], [2, 4], [1, 2]
        a.decode_images, a.hf_time_budget, a.bench_timeout = 4, 30.0, 60.0
        a.serve_args = ["--num-kv-blocks", "256", "--max-num-seqs", "8", *a.serve_args]
    if len(a.num_prompts) != len(a.concurrency):
        ap.error("give one --num-prompts per --concurrency")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    from flatout.demo_vl import DEMO_VL_CONFIG
    from flatout.models.presets import PRESETS

    if a.model:
        model = tokenizer = a.model
        cfg_dict = json.loads((Path(a.model) / "config.json").read_text())
        label = a.model
        note = f"Model: {a.model} (its own tokenizer), load format {a.load_format}."
    else:
        base = DEMO_VL_CONFIG if a.quick else PRESETS["autoglm-phone-9b"].config
        folder = build_checkpoint(base, out / "checkpoint")
        model = tokenizer = str(folder)
        cfg_dict = json.loads((folder / "config.json").read_text())
        label = ("demo-vl shapes" if a.quick else "autoglm-phone-9b shapes") + \
            ", demo-vl tokenizer, dummy weights"
        note = ("Model: demo-vl's config.json and tokenizer, random weights (--quick)."
                if a.quick else
                "Model: the `autoglm-phone-9b` preset's config.json with the demo-vl tokenizer, "
                "chat template, vocabulary (4,104 ids instead of 151,552) and image / stop token "
                "ids (no GLM tokenizer is available offline, and a random-weight model over "
                "151,552 ids writes ids that tokenizer cannot decode, which the load tester "
                "could not time); every other number is the preset's (GLM-4.1V-9B shapes); "
                "random weights on both sides.")
    spec = ImageSpec.parse(a.image_size)
    grid = image_grid(spec.height, spec.width, max_pixels=a.max_pixels)
    import torch

    device = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/bench_vision_serve.py", *sys.argv[1:]]),
        "model_label": label, "model_note": note, "args": vars(a),
        "image_tokens": grid.num_tokens, "grid_thw": list(grid.grid_thw)}
    print(f"image {a.image_size} -> {grid.num_tokens} image tokens; serving {label}", flush=True)
    parts: dict[str, float] = {}
    t = time.perf_counter()
    result["decode"] = decode_part(a)
    parts["decode"], t = time.perf_counter() - t, time.perf_counter()
    result["flatout"] = serve_part(a, model, tokenizer, out)
    parts["flatout"], t = time.perf_counter() - t, time.perf_counter()
    if not a.skip_hf:
        left = a.time_limit - (time.perf_counter() - t_start) - 45  # model init and warm-up
        a.hf_time_budget = max(5.0, min(a.hf_time_budget, left))
        (out / "bench_vision_serve.json").write_text(json.dumps(result, indent=1, default=str))
        try:  # what flatout measured is kept (written above and below) if this part fails
            result["transformers"] = hf_part(a, cfg_dict, device)
        except Exception as e:  # reported in the table; the script goes on
            result["transformers"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        parts["transformers"] = time.perf_counter() - t
        best = result["transformers"].get("best")
        if best is not None and best["image_tokens"] != grid.num_tokens:
            result["transformers"]["error"] = (
                f"transformers' processor gives {best['image_tokens']} image tokens, flatout "
                f"{grid.num_tokens}")
    result["part_seconds"] = parts
    # named only now: a CUDA context in this process would hold memory the server could use
    result["device"] = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    result["total_s"] = time.perf_counter() - t_start
    table = markdown(result)
    (out / "bench_vision_serve.md").write_text(table)
    (out / "bench_vision_serve.json").write_text(json.dumps(result, indent=1, default=str))
    print(table)
    print(f"wrote {out / 'bench_vision_serve.md'} and .json in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
