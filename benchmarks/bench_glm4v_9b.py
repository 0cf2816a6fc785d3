"""GPU benchmark of GLM-4V-9B (`glm-4v-9b` preset, dummy weights, bf16).

    python benchmarks/bench_glm4v_9b.py --out DIR

Image encode time (preprocessing of a 1920 x 1080 uint8 image to 1120 x 1120 on the GPU, then
the EVA2-CLIP tower and adapter: 1602 embeddings) at 1 and 4 images, with MFU against the
measured bf16 matmul rate; and the text decode step at batch 1 and 32 (context 512, CUDA
graphs) with MBU = (weight bytes read + KV bytes read) / step / copy bandwidth, the tower's
weights not counted (a decode step does not read them). Writes DIR/bench_glm4v_9b.md and .json.
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


def tower_flops(eva) -> float:  # noqa: ANN001 - EvaVisionConfig
    """Matmul FLOPs of one image through the tower and adapter."""
    n, h, i = eva.grid**2 + 1, eva.hidden_size, eva.intermediate_size
    o, g, m = eva.out_hidden_size, eva.glu_intermediate_size, eva.num_patch_embeds
    patch = 2 * (n - 1) * eva.in_channels * eva.patch_size**2 * h
    block = 2 * n * (4 * h * h + 2 * h * i) + 4 * n * n * h  # linears + QK^T and PV
    adapter = 2 * m * (4 * h * o + o * o + 3 * o * g)
    return patch + eva.depth * block + adapter


def run(model: str = "glm-4v-9b", device: str = "auto") -> dict:
    from flatout import LLM, SamplingParams
    from flatout.engine.messages import EngineCoreRequest
    from flatout.multimodal.preprocess import preprocess_fixed_size

    t0 = time.monotonic()
    llm = LLM(model, load_format="dummy", max_model_len=2048, max_num_seqs=64, device=device,
              max_num_batched_tokens=4096, enable_prefix_caching=False)
    core = llm.engine.core
    cfg = core.model_config
    eva = cfg.eva_vision
    assert eva is not None, f"{model} has no EVA2-CLIP tower"
    tower_bytes = eva.num_params * cfg.dtype_bytes
    embed_bytes = cfg.vocab_size * cfg.hidden_size * cfg.dtype_bytes
    res: dict = {"startup_s": time.monotonic() - t0, "dtype": cfg.dtype,
                 "weight_bytes_read": cfg.weight_bytes - tower_bytes - embed_bytes,
                 "kv_bytes_per_token": cfg.kv_bytes_per_token,
                 "tower_params": eva.num_params, "tower_flops": tower_flops(eva),
                 "cuda_graphs": core.runner.graphs is not None}
    net = core.runner.model
    dev = core.runner.device
    raw = torch.randint(0, 256, (1080, 1920, 3), dtype=torch.uint8).to(dev)
    encode = []
    with torch.inference_mode():
        for n in (1, 4):
            times = []
            for _ in range(4):
                sync()
                t = time.perf_counter()
                images = torch.stack([preprocess_fixed_size(raw, eva.image_size)] * n)
                out = net.encode_images(images.to(core.runner.dtype))
                sync()
                times.append(time.perf_counter() - t)
            assert out.shape == (n, eva.num_patch_embeds + 2, cfg.hidden_size)
            encode.append({"images": n, "s": min(times[1:])})
    res["encode"] = encode
    gen = torch.Generator().manual_seed(0)
    decode = []
    for bs in (1, 32):
        for i in range(bs):
            ids = torch.randint(100, min(150000, cfg.vocab_size), (512,), generator=gen).tolist()
            p = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
            core.add_request(EngineCoreRequest(f"d{bs}-{i}", ids, p, 48))
        timing = steady_decode(core)
        decode.append({"batch": bs, **timing,
                       "bytes": res["weight_bytes_read"] + bs * 536 * cfg.kv_bytes_per_token})
    res["decode"] = decode
    return res


def report(device: dict, res: dict, cmd: str) -> str:
    bw, peak = device["copy_bandwidth_Bps"], device["bf16_matmul_flops"]
    lines = [f"# GLM-4V-9B (glm-4v-9b, dummy weights, {res['dtype']}) on {device['name']}", "",
             f"`{cmd}`", "",
             f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s; tower "
             f"{res['tower_params'] / 1e9:.2f} B params, {res['tower_flops'] / 1e12:.1f} TFLOP "
             f"per image", "",
             "| images (1920x1080 -> 1120x1120, preprocess + tower) | s | ms per image | MFU |",
             "|---:|---:|---:|---:|"]
    for e in res["encode"]:
        mfu = res["tower_flops"] * e["images"] / e["s"] / peak
        lines.append(f"| {e['images']} | {e['s']:.3f} | {e['s'] / e['images'] * 1e3:.1f} | "
                     f"{mfu:.0%} |")
    lines += ["", "| text decode batch (ctx 512) | step ms | floor ms | MBU | engine busy |",
              "|---:|---:|---:|---:|---:|"]
    for d in res["decode"]:
        floor = d["bytes"] / bw * 1e3
        lines.append(f"| {d['batch']} | {d['step_ms']:.2f} | {floor:.2f} | "
                     f"{floor / d['step_ms']:.0%} | {d['gpu_busy_events']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = measure_device()
    torch.cuda.empty_cache()
    res = run()
    cmd = "python benchmarks/bench_glm4v_9b.py --out DIR"
    (out / "bench_glm4v_9b.json").write_text(json.dumps({"device": device, **res}, indent=1))
    (out / "bench_glm4v_9b.md").write_text(report(device, res, cmd))
    print((out / "bench_glm4v_9b.md").read_text())


if __name__ == "__main__":
    main()
