"""GPU benchmark of GLM-4V-9B (`glm-4v-9b` preset, dummy weights, bf16), on the engine's own
image path.

    python benchmarks/bench_glm4v_9b.py --out DIR

Image encode time as a step runs it (ModelRunner._encode_images: the uint8 1920 x 1080 pixels to
the GPU, bicubic resize to 1120 x 1120 and CLIP normalisation there, the EVA2-CLIP tower and
adapter batched over the step's images: 1602 embeddings each) at 1 and 4 images, with MFU
against the measured bf16 matmul rate, and the GPU preprocessing alone; the time to the first
token of one request with an image and 200 text tokens on an idle engine; and the decode step
at batch 1 and 32 of requests that each carry their own image (1602 image tokens + 512 text,
CUDA graphs) with MBU = (weight bytes read + KV bytes read) / step / copy bandwidth, the
tower's weights not counted (a decode step does not read them). Writes DIR/bench_glm4v_9b.md
and .json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
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


def image_request(llm, rid: str, text_len: int, seed: int, max_tokens: int):  # noqa: ANN001, ANN201
    """An engine request: [gMASK]<sop><|user|>\n, the image span, text_len random ids,
    <|assistant|>, with its own random 1920 x 1080 image (widened as the server does)."""
    from flatout import SamplingParams
    from flatout.engine.messages import EngineCoreRequest

    cfg = llm.engine.core.model_config
    eva = cfg.eva_vision
    gen = torch.Generator().manual_seed(seed)
    text = torch.randint(100, min(150000, cfg.vocab_size - 10), (text_len,),
                         generator=gen).tolist()
    real = cfg.vocab_size > 151337  # the real vocabulary: GLM-4's chat tokens around it
    head = [151331, 151333, 151336, 198] if real else []
    ids = (head + [eva.boi_token_id, eva.placeholder_token_id, eva.eoi_token_id] + text
           + ([151337] if real else []))
    pixels = np.random.default_rng(seed).integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    p = llm.engine.inputs.process(ids, params, images=[pixels])
    return EngineCoreRequest(rid, p.token_ids, params, p.max_tokens, mm_items=p.mm_items)


def run(model: str = "glm-4v-9b", device: str = "auto", load_format: str = "dummy") -> dict:
    from flatout import LLM
    from flatout.engine.batch import MultiModalItem
    from flatout.multimodal.preprocess import preprocess_fixed_size

    t0 = time.monotonic()
    llm = LLM(model, load_format=load_format, max_model_len=4096, max_num_seqs=64, device=device,
              max_num_batched_tokens=4096, enable_prefix_caching=False)
    core = llm.engine.core
    runner = core.runner
    cfg = core.model_config
    eva = cfg.eva_vision
    assert eva is not None, f"{model} has no EVA2-CLIP tower"
    tower_bytes = eva.num_params * cfg.dtype_bytes
    embed_bytes = cfg.vocab_size * cfg.hidden_size * cfg.dtype_bytes
    res: dict = {"startup_s": time.monotonic() - t0, "dtype": cfg.dtype,
                 "weight_bytes_read": cfg.weight_bytes - tower_bytes - embed_bytes,
                 "kv_bytes_per_token": cfg.kv_bytes_per_token,
                 "tower_params": eva.num_params, "tower_flops": tower_flops(eva),
                 "cuda_graphs": runner.graphs is not None,
                 "memory": runner.memory.describe()}
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (1080, 1920, 3), dtype=np.uint8)
    s = eva.image_size
    with torch.inference_mode():
        times = []
        for _ in range(6):
            sync()
            t = time.perf_counter()
            preprocess_fixed_size(torch.from_numpy(raw).to(runner.device), s)
            sync()
            times.append(time.perf_counter() - t)
        res["preprocess_ms"] = min(times[1:]) * 1e3
        encode = []
        for n in (1, 4):
            times = []
            for rep in range(4):
                items = [MultiModalItem(0, eva.num_image_tokens, (1, eva.grid, eva.grid), (s, s),
                                        f"bench-{n}-{rep}-{i}".encode(), raw) for i in range(n)]
                sync()
                t = time.perf_counter()
                runner._encode_images(items)  # the step's own encoder call
                sync()
                times.append(time.perf_counter() - t)
                out = runner.encoder_outputs[items[0].content_hash]
                assert out.shape == (eva.num_image_tokens, cfg.hidden_size)
                runner.encoder_outputs.clear()
            encode.append({"images": n, "s": min(times[1:])})
    res["encode"] = encode

    ttft = []
    for rep in range(3):
        core.add_request(image_request(llm, f"ttft-{rep}", 200, 100 + rep, 2))
        sync()
        t = time.perf_counter()
        first = None
        while core.has_unfinished():
            outs = core.step()
            if first is None and any(o.new_token_ids for o in outs):
                first = time.perf_counter() - t
        ttft.append(first)
    res["ttft_s"] = min(ttft[1:])

    decode = []
    prompt_len = 0
    for bs in (1, 32):
        for i in range(bs):
            req = image_request(llm, f"d{bs}-{i}", 512, 1000 * bs + i, 48)
            prompt_len = len(req.prompt_token_ids)
            core.add_request(req)
        timing = steady_decode(core)
        ctx = prompt_len + 24  # the middle of the decode phase
        decode.append({"batch": bs, "context": ctx, **timing,
                       "bytes": res["weight_bytes_read"] + bs * ctx * cfg.kv_bytes_per_token})
    res["decode"] = decode
    llm.shutdown()
    return res


def report(device: dict, res: dict, cmd: str) -> str:
    bw, peak = device["copy_bandwidth_Bps"], device["bf16_matmul_flops"]
    lines = [f"# GLM-4V-9B (glm-4v-9b, dummy weights, {res['dtype']}) on {device['name']}", "",
             f"`{cmd}`", "",
             f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s; tower "
             f"{res['tower_params'] / 1e9:.2f} B params, {res['tower_flops'] / 1e12:.1f} TFLOP "
             f"per image", "",
             "| images per step (1920x1080 -> 1120x1120, to the device, preprocess + tower) "
             "| s | ms per image | MFU |",
             "|---:|---:|---:|---:|"]
    for e in res["encode"]:
        mfu = res["tower_flops"] * e["images"] / e["s"] / peak
        lines.append(f"| {e['images']} | {e['s']:.3f} | {e['s'] / e['images'] * 1e3:.1f} | "
                     f"{mfu:.0%} |")
    lines += ["", f"GPU preprocessing alone (1920x1080 uint8 to the device, resize, normalise): "
              f"{res['preprocess_ms']:.2f} ms per image; time to first token of one request "
              f"(1 image + 200 text tokens, idle engine): {res['ttft_s'] * 1e3:.0f} ms", "",
              "| decode batch (each request 1 image + 512 text) | context | step ms | floor ms "
              "| MBU | engine busy |", "|---:|---:|---:|---:|---:|---:|"]
    for d in res["decode"]:
        floor = d["bytes"] / bw * 1e3
        lines.append(f"| {d['batch']} | {d['context']} | {d['step_ms']:.2f} | {floor:.2f} | "
                     f"{floor / d['step_ms']:.0%} | {d['gpu_busy_events']:.0%} |")
    lines += ["", f"CUDA graphs: {res['cuda_graphs']}; memory: {res['memory']}"]
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
    cmd = f"python benchmarks/bench_glm4v_9b.py --out {a.out}"
    (out / "bench_glm4v_9b.json").write_text(json.dumps({"device": device, **res}, indent=1))
    (out / "bench_glm4v_9b.md").write_text(report(device, res, cmd))
    print((out / "bench_glm4v_9b.md").read_text())


if __name__ == "__main__":
    main()
