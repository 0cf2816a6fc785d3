"""GLM-4.1V image path on one GPU: preprocessing, vision encoder (1 and 8 screenshots, with MFU),
TTFT and decode step through the whole engine, beside transformers' vision tower on the same
pixels. Writes a markdown table (and prints it).

    python benchmarks/bench_vision.py --out benchmarks/results/bench_vision_h200.md

Defaults: the glm-4.1v-9b-thinking preset with dummy weights in bf16, one 1080x2400 screenshot
(random PNG-like pixels) resized under max_pixels 5e6 (grid 168x74, 3,108 image tokens) plus 200
text tokens, 128 output tokens. --model PATH --device cpu --image-size 112x140 runs it on a tiny
checkpoint as a smoke test.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flatout import LLM, SamplingParams  # noqa: E402
from flatout.multimodal.image_size import image_grid  # noqa: E402
from flatout.multimodal.preprocess import preprocess_image  # noqa: E402

H200_BF16_DENSE_FLOPS = 989e12  # spec sheet; MFU is against it


def timed(fn: Callable[[], object], device: torch.device, reps: int = 5) -> float:
    """Median seconds of fn() after one warm-up."""
    fn()
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t)
    return float(np.median(out))


def encoder_flops(vc, num_patches: list[int]) -> float:  # noqa: ANN001
    """Matmul FLOPs of the tower: 2 x params x patches for the linears (the merger runs on a
    quarter of the patches), plus attention's QK^T and PV per image."""
    n = sum(num_patches)
    h = vc.hidden_size
    linear = 2 * n * (vc.patch_dim * h + vc.depth * (4 * h * h + 3 * h * vc.out_hidden_size))
    o, m = vc.out_hidden_size, vc.spatial_merge_size**2
    merge = 2 * (n / m) * (h * m * o + o * o + 3 * o * vc.intermediate_size)
    attn = sum(4 * p * p * h * vc.depth for p in num_patches)
    return linear + merge + attn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="glm-4.1v-9b-thinking")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--image-size", default="1080x2400", help="WIDTHxHEIGHT")
    ap.add_argument("--max-pixels", type=int, default=5_000_000)
    ap.add_argument("--text-tokens", type=int, default=200)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    width, height = (int(v) for v in a.image_size.split("x"))
    dummy = not Path(a.model).is_dir()
    llm = LLM(a.model, load_format="dummy" if dummy else "auto", device=a.device,
              max_model_len=a.max_model_len, max_num_batched_tokens=a.max_model_len,
              enable_prefix_caching=False)
    engine = llm.engine
    engine.inputs.max_pixels = a.max_pixels
    cfg = engine.model_config
    vc = cfg.vision
    assert vc is not None, "not a vision model"
    runner = engine.core.runner
    model = runner.model
    dtype = runner.dtype
    grid = image_grid(height, width, max_pixels=a.max_pixels)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    resized = (grid.resized_height, grid.resized_width)
    rows = [("image", f"{width}x{height} -> {resized[1]}x{resized[0]}, grid {grid.grid_thw}, "
                      f"{grid.num_tokens} tokens")]

    gpu_image = torch.from_numpy(image).to(device)
    t_pre = timed(lambda: preprocess_image(gpu_image, resized), device)
    rows.append(("GPU preprocessing (uint8 on device -> pixel_values)", f"{t_pre * 1e3:.2f} ms"))
    pixels = preprocess_image(gpu_image, resized).to(dtype)
    n = pixels.shape[0]
    with torch.inference_mode():
        for batch in (1, 8):
            pv = pixels.repeat(batch, 1)
            grids = [grid.grid_thw] * batch
            t = timed(lambda pv=pv, grids=grids: model.encode_images(pv, grids), device)
            mfu = encoder_flops(vc, [n] * batch) / t / H200_BF16_DENSE_FLOPS
            rows.append((f"flatout vision encoder, {batch} image(s)",
                         f"{t * 1e3:.1f} ms ({mfu * 100:.0f} % MFU of 989 TFLOP/s)"))
    if not a.skip_hf:
        import transformers
        from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel

        hf_cfg = transformers.Glm4vConfig().vision_config
        hf_cfg._attn_implementation = "sdpa"
        hf_visual = Glm4vVisionModel(hf_cfg).to(device=device, dtype=dtype).eval()
        thw = torch.tensor([grid.grid_thw], device=device)
        with torch.inference_mode():
            t = timed(lambda: hf_visual(pixels, grid_thw=thw), device)
        mfu = encoder_flops(vc, [n]) / t / H200_BF16_DENSE_FLOPS
        rows.append(("transformers Glm4vVisionModel (sdpa), 1 image",
                     f"{t * 1e3:.1f} ms ({mfu * 100:.0f} % MFU)"))
        del hf_visual

    text = rng.integers(10, min(50000, vc.image_start_token_id - 10), a.text_tokens).tolist()
    ids = [*text[:10], vc.image_start_token_id, vc.image_token_id, vc.image_end_token_id,
           *text[10:]]

    def request(max_tokens: int, seed: int) -> float:
        img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)  # a new image: no cache
        prompt = {"prompt": ids, "multi_modal_data": {"image": img}}
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompt, params)
        return time.perf_counter() - t

    def text_request(max_tokens: int) -> float:  # as long, without the image
        prompt = (text * (grid.num_tokens // len(text) + 2))[: grid.num_tokens + len(ids)]
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t = time.perf_counter()
        llm.generate(prompt, params)
        return time.perf_counter() - t

    request(1, 0)  # warm-up
    ttft = float(np.median([request(1, s) for s in range(3)]))
    total = request(a.output_tokens, 9)
    step = (total - ttft) / max(1, a.output_tokens - 1)
    text_request(a.output_tokens)
    text_step = (text_request(a.output_tokens) - text_request(1)) / max(1, a.output_tokens - 1)
    rows.append((f"TTFT, 1 request ({grid.num_tokens} image + {a.text_tokens} text tokens, "
                 "offline LLM, idle engine)", f"{ttft * 1e3:.1f} ms"))
    rows.append(("decode step, batch 1 (after the image)", f"{step * 1e3:.2f} ms"))
    rows.append(("decode step, batch 1, text-only prompt of the same length",
                 f"{text_step * 1e3:.2f} ms"))
    rows.append((f"one request, {a.output_tokens} output tokens", f"{total:.2f} s"))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"# GLM-4.1V image path ({a.model}, {'dummy' if dummy else 'real'} weights, "
             f"{str(dtype).removeprefix('torch.')}, {name})", "",
             f"`python benchmarks/bench_vision.py {' '.join(sys.argv[1:])}`", "",
             "| what | measured |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if a.out:
        Path(a.out).write_text(table)


if __name__ == "__main__":
    main()
