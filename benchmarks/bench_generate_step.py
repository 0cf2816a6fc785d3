"""A decode step through `LLM.generate` end to end (issue 19, item 4), beside the steady state.

    python benchmarks/bench_generate_step.py --out benchmarks/results/generate_step_h200.md

For N fresh prompts of 512 random tokens (GLM-4-9B shapes, dummy weights, prefix caching off so
every run prefills again): T(1 output token) and T(129 output tokens) through `LLM.generate`,
and the step cost (T(129) - T(1)) / 128, which holds everything a step costs on the host as
well as on the GPU; beside it the steady decode step of the engine at the same batch (the
median interval between steps once all N decode, as benchmarks/bench_gpu.py measures it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="glm-4-9b")
    ap.add_argument("--batches", default="32,256")
    a = ap.parse_args()
    from flatout import LLM, SamplingParams

    llm = LLM(a.model, load_format="dummy", max_model_len=2048, max_num_seqs=256,
              max_num_batched_tokens=8192, enable_prefix_caching=False)
    core = llm.engine.core
    vocab = core.model_config.vocab_size
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in [int(b) for b in a.batches.split(",")]:
        def run(max_tokens: int, n: int = n) -> float:
            prompts = [torch.randint(100, vocab - 100, (512,), generator=gen).tolist()
                       for _ in range(n)]
            params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
            t = time.perf_counter()
            outs = llm.generate(prompts, params)
            el = time.perf_counter() - t
            assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
            return el

        run(8)  # warm: graphs, allocator
        t1 = statistics.median(run(1) for _ in range(3))
        t129 = statistics.median(run(129) for _ in range(3))
        steps = []  # steady state: the interval between steps while all n decode
        from flatout.engine.messages import EngineCoreRequest
        for i in range(n):
            p = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
            core.add_request(EngineCoreRequest(f"s{n}-{i}", torch.randint(
                100, vocab - 100, (512,), generator=gen).tolist(), p, 60))
        while core.has_unfinished():
            t = time.perf_counter()
            core.step()
            steps.append(time.perf_counter() - t)
        steady = statistics.median(steps[len(steps) // 3: -5])
        rows.append((n, t1, t129, (t129 - t1) / 128, steady))
        print(rows[-1], flush=True)
    lines = ["# A decode step through LLM.generate, end to end", "",
             f"`python benchmarks/bench_generate_step.py --out {a.out} --model {a.model}` on "
             f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}; 512-token "
             "fresh prompts, greedy, ignore_eos; medians of 3 runs.", "",
             "| batch | T(1 token) s | T(129 tokens) s | (T129 - T1) / 128 ms | steady step ms |",
             "|---:|---:|---:|---:|---:|"]
    for n, t1, t129, step, steady in rows:
        lines.append(f"| {n} | {t1:.3f} | {t129:.3f} | {step * 1e3:.2f} | {steady * 1e3:.2f} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    llm.shutdown()


if __name__ == "__main__":
    main()
