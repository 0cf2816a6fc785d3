"""CPU benchmark of the output path: one long streamed completion, step by step.

    python benchmarks/bench_output_path.py --out benchmarks/results/output_path_cpu.md
        [--tokens 8000] [--repeats 3]

A fake engine core emits one token per step (with its logprob) for one request of `--tokens`
tokens, on the demo tokenizer (flatout/demo.py); each step goes through the API process's output
path as it runs when serving:
  - processor: `OutputProcessor.process` alone (detokenization, stop strings, logprob texts, the
    step's delta);
  - processor + stream: the same deltas through the SSE stream encoder of /v1/completions
    (server/stream.py, with logprobs=1 and a stop string), as the server streams them.
It prints the mean time per step over the 256 steps before L = 1k, 2k, 4k, 8k generated tokens
(the best of `--repeats` runs): flat in L when a step's work does not grow with the output so far.
Writes the table to `--out` (markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from flatout.demo import ASSETS
from flatout.engine.messages import EngineCoreOutput, TokenLogprobs
from flatout.engine.output_processor import OutputProcessor
from flatout.engine.outputs import RequestOutput
from flatout.sampling_params import SamplingParams
from flatout.tokenizers import load_tokenizer

CHECKPOINTS = (1000, 2000, 4000, 8000)
WINDOW = 256  # steps averaged before each checkpoint
STOP = ["@@@"]  # never generated: a stop string held back and searched for at every step


def token_stream(tok: Any, num_tokens: int) -> list[int]:
    """The demo corpus' tokens, repeated to `num_tokens`."""
    corpus = (ASSETS / "corpus.txt").read_text()
    ids = tok.encode(corpus, add_special_tokens=False)
    return (ids * (num_tokens // len(ids) + 1))[:num_tokens]


def core_output(ids: list[int], step: int) -> EngineCoreOutput:
    token = ids[step]
    finish = "length" if step == len(ids) - 1 else None
    return EngineCoreOutput("bench", 0, [token], [TokenLogprobs(token, -0.5, {token: -0.5})],
                            finish_reason=finish)  # type: ignore[arg-type]


def params(num_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=num_tokens, logprobs=1, stop=STOP)


def run_processor(tok: Any, ids: list[int]) -> list[float]:
    """Step start times (plus the end) of the output processor alone."""
    proc = OutputProcessor(tok)
    proc.add_request("bench", None, [1, 2, 3], params(len(ids)))
    marks = []
    for step in range(len(ids)):
        marks.append(time.perf_counter())
        proc.process([core_output(ids, step)])
    marks.append(time.perf_counter())
    return marks


def run_stream(tok: Any, ids: list[int]) -> list[float]:
    """Step start times (plus the end) of the output processor feeding the completions stream
    encoder; a step ends when the encoder has sent its chunk (or skipped it)."""
    from flatout.server.protocol import CompletionRequest
    from flatout.server.serving_completion import _CompletionChoices, _Prepared
    from flatout.server.stream import stream_events

    proc = OutputProcessor(tok)
    p = params(len(ids))
    proc.add_request("bench", None, [1, 2, 3], p)
    marks: list[float] = []

    async def engine() -> AsyncIterator[RequestOutput]:
        for step in range(len(ids)):
            marks.append(time.perf_counter())
            results, _ = proc.process([core_output(ids, step)])
            for out in results:
                yield out

    texts: dict[int, str] = {}

    def token_text(token_id: int) -> str:
        if token_id not in texts:
            texts[token_id] = tok.decode([token_id], skip_special_tokens=False)
        return texts[token_id]

    tracker = SimpleNamespace(observe=lambda out: None, finish=lambda request: None)
    state: Any = SimpleNamespace(tokenizer=tok, token_text=token_text,
                                 metrics=SimpleNamespace(track=lambda arrival: tracker))
    req = CompletionRequest(prompt="x", logprobs=1, stream=True, stop=STOP)
    prepared = _Prepared("cmpl-bench", "demo", [[1, 2, 3]], [""], p)
    ticket: Any = SimpleNamespace(end=lambda outcome: None)
    events = stream_events(state, lambda: [engine()], 1, _CompletionChoices(state, req, prepared),
                           base={"id": "cmpl-bench", "object": "text_completion", "created": 0,
                                 "model": "demo"},
                           include_usage=False, ticket=ticket, arrival=0.0)

    async def drain() -> int:
        return sum([len(chunk) async for chunk in events])

    asyncio.run(drain())
    marks.append(time.perf_counter())
    return marks


def per_step_us(marks: list[float], at: int) -> float:
    return (marks[at] - marks[at - WINDOW]) / WINDOW * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="markdown file for the table")
    ap.add_argument("--tokens", type=int, default=8000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    tok = load_tokenizer(ASSETS)
    ids = token_stream(tok, args.tokens)
    points = [c for c in CHECKPOINTS if c <= args.tokens]
    rows = []
    for name, run in (("processor", run_processor), ("processor + stream", run_stream)):
        runs = [run(tok, ids) for _ in range(args.repeats)]
        rows.append((name, [min(per_step_us(m, at) for m in runs) for at in points]))
    head = "| path | " + " | ".join(f"L = {c // 1000}k" for c in points) + " |"
    lines = [
        f"Output path, one {args.tokens}-token completion streamed on the demo tokenizer "
        f"(logprobs=1, one stop string): mean time per step (us) over the {WINDOW} steps "
        f"before L, best of {args.repeats}. Python {platform.python_version()}, "
        f"{platform.machine()}.",
        "",
        head,
        "|" + "---|" * (len(points) + 1),
        *(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |"
          for name, values in rows),
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
