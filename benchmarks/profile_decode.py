"""Kernel profile of steady decode steps: GLM-4-9B (dummy weights), prompts of 512 tokens, at
batch 1, 32 and 256. Per kernel: time per step and launches per step (per layer where it runs in
every layer), so that a reader sees what runs between the GEMMs and what it costs.

    python benchmarks/profile_decode.py --out DIR     # writes DIR/profile_decode.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decode_timing import run_to_decode  # noqa: E402

from flatout import LLM, SamplingParams  # noqa: E402
from flatout.engine.messages import EngineCoreRequest  # noqa: E402


def profile(core, steps: int) -> tuple[dict[str, list[float]], float]:  # noqa: ANN001
    from torch.profiler import ProfilerActivity, profile

    run_to_decode(core)
    for _ in range(3):
        core.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            core.step()
        torch.cuda.synchronize()
    per: dict[str, list[float]] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        rec = per.setdefault(ev.name[:90], [0.0, 0.0])
        rec[0] += ev.device_time / steps / 1e3  # ms per step
        rec[1] += 1 / steps  # launches per step
    while core.has_unfinished():
        core.step()
    return per, sum(r[0] for r in per.values())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    llm = LLM("glm-4-9b", load_format="dummy", max_model_len=2048, max_num_seqs=256,
              max_num_batched_tokens=8192, enable_prefix_caching=False)
    core = llm.engine.core
    layers = 40
    g = torch.Generator().manual_seed(0)
    lines = ["# Decode step kernel profile (H200, GLM-4-9B dummy weights, ctx 512)", "",
             "`python benchmarks/profile_decode.py --out DIR`", ""]
    for bs in (1, 32, 256):
        for i in range(bs):
            ids = torch.randint(100, 150000, (512,), generator=g).tolist()
            p = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
            core.add_request(EngineCoreRequest(f"{bs}-{i}", ids, p, 40))
        per, total = profile(core, steps=10)
        lines += [f"## batch {bs}: {total:.3f} ms of kernels per step", "",
                  "| kernel | ms/step | share | launches/step | per layer |",
                  "|---|---|---|---|---|"]
        for name, (ms, n) in sorted(per.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"| `{name}` | {ms:.3f} | {ms / total:.1%} | {n:.0f} | "
                         f"{n / layers:.2f} |")
        lines.append("")
    text = "\n".join(lines)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "profile_decode.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
