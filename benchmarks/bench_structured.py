"""GPU benchmark: the cost of structured output (a grammar per sequence) on GLM-4-9B shapes.

    python benchmarks/bench_structured.py --out DIR [--model glm-4-9b] [--batch 1 64]

With `load_format="dummy"` (real shapes, random weights, no tokenizer) and a synthetic byte
vocabulary of the model's size (151,552 tokens; `--tokenizer PATH` uses a real checkpoint's
instead), it measures:
  1. grammar compile time per schema (a nested JSON schema, any JSON object, a regex, a choice):
     cold (a compiler without cache), median of several compiles;
  2. the decode step time at each batch size with 512 tokens of context, every row free vs every
     row under the nested schema (the median interval between engine steps while the whole
     batch decodes; the grammar rows fill their bitmask while the step's forward runs);
  3. the pieces: filling one step's bitmask on the host, and applying it to [B, V] logits on
     the device (flatout's torch op, and xgrammar's own kernel for comparison).
Writes DIR/bench_structured.json and DIR/bench_structured.md (the tables and the command).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import xgrammar as xgr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from decode_timing import run_to_decode  # noqa: E402 - beside this file

from flatout import LLM, SamplingParams  # noqa: E402
from flatout.engine.structured import BitmaskFiller, GrammarCompiler, SequenceGrammar  # noqa: E402
from flatout.layers.sampler import SamplingBatch, SamplingRow, apply_grammar_bitmask  # noqa: E402
from flatout.sampling_params import StructuredOutputsParams  # noqa: E402

NESTED_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "maxLength": 60},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string", "maxLength": 60},
                        "city": {"type": "string", "maxLength": 40},
                        "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                        "country": {"enum": ["FR", "DE", "IT", "ES", "US", "CN"]},
                    },
                    "required": ["street", "city", "zip", "country"],
                },
            },
            "required": ["name", "email", "address"],
        },
        "items": {
            "type": "array",
            "minItems": 4,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 12},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                    "price": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}},
                },
                "required": ["sku", "quantity", "price", "tags"],
            },
        },
        "paid": {"type": "boolean"},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["order_id", "customer", "items", "paid", "notes"],
}
OTHER_SPECS = {
    "json_object": StructuredOutputsParams(json_object=True),
    "regex (date time)": StructuredOutputsParams(
        regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z"),
    "choice (4 strings)": StructuredOutputsParams(choice=["positive", "negative", "neutral",
                                                          "mixed"]),
}
CONTEXT = 512


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    """A byte vocabulary shaped like a BPE one: every byte, then JSON punctuation runs, digit
    runs and word pieces (with and without a leading space) up to `size` distinct tokens."""
    rng = random.Random(seed)
    vocab: list[bytes] = [bytes([b]) for b in range(256)]
    seen = set(vocab)

    def add(t: bytes) -> None:
        if t not in seen and len(vocab) < size:
            seen.add(t)
            vocab.append(t)

    punct = ['{"', '":', '",', '"}', '},', '}}', '[{', '}]', '": "', '", "', ' {', ' [', '],',
             '":[', '":{', '": ', ', "', 'true', 'false', 'null', '\n', '  ', '    ', '\n  ']
    for p in punct:
        add(p.encode())
    for n in range(1000):
        add(str(n).encode())
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < size:
        k = rng.choice((2, 3, 3, 4, 4, 5, 5, 6, 7, 8))
        word = "".join(rng.choice(letters) for _ in range(k))
        if rng.random() < 0.2:
            word = word.capitalize()
        add((" " + word if rng.random() < 0.5 else word).encode())
    return vocab


def tokenizer_info(args: argparse.Namespace, vocab_size: int, eos: list[int]
                   ) -> xgr.TokenizerInfo:
    if args.tokenizer:
        from flatout.tokenizers import load_tokenizer

        return xgr.TokenizerInfo.from_huggingface(load_tokenizer(args.tokenizer),
                                                  vocab_size=vocab_size, stop_token_ids=eos)
    return xgr.TokenizerInfo(synthetic_vocab(vocab_size), xgr.VocabType.RAW,
                             vocab_size=vocab_size, stop_token_ids=eos)


# -- 1. compile time ---------------------------------------------------------------------------
def compile_times(info: xgr.TokenizerInfo, vocab_size: int, repeat: int) -> list[dict]:
    specs = {"nested JSON schema": StructuredOutputsParams(json=NESTED_SCHEMA), **OTHER_SPECS}
    rows = []
    for name, so in specs.items():
        times = []
        for _ in range(repeat):
            compiler = GrammarCompiler(None, vocab_size, tokenizer_info=info)  # no cache
            t0 = time.perf_counter()
            compiler.compile_now(so)
            times.append(time.perf_counter() - t0)
            compiler.shutdown()
        rows.append({"grammar": name, "compile_ms": statistics.median(times) * 1e3,
                     "min_ms": min(times) * 1e3})
    return rows


# -- 2. step time ------------------------------------------------------------------------------
def step_time(llm: LLM, batch: int, steps: int, structured: bool) -> dict:
    """Median interval between steps while all `batch` rows decode."""
    core = llm.engine.core
    rng = random.Random(batch)
    so = StructuredOutputsParams(json=NESTED_SCHEMA) if structured else None
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=steps + 16, ignore_eos=True,
                            structured_outputs=so)
    if so is not None:  # compiled before the clock starts (compile time is measured apart)
        core.grammars.submit(so).result()
    ids = []
    for i in range(batch):
        prompt = [rng.randrange(100, core.model_config.vocab_size - 100) for _ in range(CONTEXT)]
        llm.engine.add_request(f"bench-{structured}-{batch}-{i}", prompt, params)
        ids.append(f"bench-{structured}-{batch}-{i}")
    run_to_decode(core)
    stamps = [time.perf_counter()]
    full = []
    for _ in range(steps):
        core.step()
        stamps.append(time.perf_counter())
        full.append(core.scheduler.num_running == batch)
    for rid in ids:
        llm.engine.abort_request(rid)
    while core.has_unfinished():
        core.step()
    intervals = [b - a for a, b, ok in zip(stamps, stamps[1:], full, strict=False) if ok]
    mid = intervals[2:-2] if len(intervals) > 8 else intervals
    return {"step_ms": statistics.median(mid) * 1e3 if mid else float("nan"),
            "steps_timed": len(mid)}


# -- 3. pieces ---------------------------------------------------------------------------------
def bitmask_pieces(info: xgr.TokenizerInfo, vocab_size: int, batch: int) -> dict:
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(NESTED_SCHEMA),
                                                             any_whitespace=False)
    so = StructuredOutputsParams(json=NESTED_SCHEMA)
    grammars: list[SequenceGrammar | None] = [SequenceGrammar.start(compiled, so, [])
                                              for _ in range(batch)]
    prefix = '{"order_id": "ABC-123456", "customer": {"name": "Ada'
    for g in grammars:
        assert g is not None
        g.matcher.accept_string(prefix)
    filler = BitmaskFiller(vocab_size)
    fills = []
    for _ in range(50):
        t0 = time.perf_counter()
        bitmask = filler.fill(grammars)
        fills.append(time.perf_counter() - t0)
    assert bitmask is not None
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: a smoke run
    logits = torch.randn(batch, vocab_size, device=dev)
    sampling = SamplingBatch.build([SamplingRow(SamplingParams(temperature=0), [1], [])] * batch,
                                   vocab_size, dev)
    sampling.grammar_bitmask = bitmask.to(dev)

    def gpu_ms(fn) -> float:  # noqa: ANN001
        for _ in range(5):
            fn()
        if dev.type != "cuda":
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(100):
            fn()
        e.record()
        torch.cuda.synchronize()
        return s.elapsed_time(e) / 100

    ours = gpu_ms(lambda: apply_grammar_bitmask(logits, sampling))
    dev_mask = sampling.grammar_bitmask
    theirs = gpu_ms(lambda: xgr.apply_token_bitmask_inplace(logits, dev_mask))
    return {"batch": batch, "fill_ms": statistics.median(fills) * 1e3,
            "apply_torch_ms": ours, "apply_xgrammar_ms": theirs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--model", default="glm-4-9b")
    ap.add_argument("--tokenizer", default=None, help="a checkpoint folder's tokenizer")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--compile-repeat", type=int, default=5)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    llm = LLM(args.model, load_format="dummy", max_model_len=2048,
              max_num_seqs=max(args.batch))
    mc = llm.engine.model_config
    eos = list(llm.engine.inputs.eos_token_ids) or [mc.vocab_size - 1]
    info = tokenizer_info(args, mc.vocab_size, eos)
    llm.engine.core.grammars = GrammarCompiler(None, mc.vocab_size, tokenizer_info=info)

    result: dict = {"model": args.model, "vocab_size": mc.vocab_size,
                    "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                    "torch": torch.__version__,
                    "tokenizer": args.tokenizer or "synthetic byte vocabulary",
                    "command": " ".join(sys.argv)}
    result["compile"] = compile_times(info, mc.vocab_size, args.compile_repeat)
    step_time(llm, max(args.batch), 8, structured=True)  # warm-up: graphs, allocator, threads
    steps = []
    for b in args.batch:
        free = step_time(llm, b, args.steps, structured=False)
        guided = step_time(llm, b, args.steps, structured=True)
        steps.append({"batch": b, "free_ms": free["step_ms"], "grammar_ms": guided["step_ms"],
                      "ratio": guided["step_ms"] / free["step_ms"],
                      "steps_timed": (free["steps_timed"], guided["steps_timed"])})
    result["steps"] = steps
    result["pieces"] = [bitmask_pieces(info, mc.vocab_size, b) for b in args.batch]
    (args.out / "bench_structured.json").write_text(json.dumps(result, indent=2))

    lines = [f"# Structured output overhead: {args.model} (dummy weights), {result['device']}",
             "", f"`{result['command']}`; vocabulary: {result['tokenizer']} "
             f"({mc.vocab_size} ids); torch {result['torch']}", "",
             "## Decode step, 512 tokens of context", "",
             "| batch | free (ms) | nested JSON schema (ms) | ratio | steps timed |",
             "|---:|---:|---:|---:|---:|"]
    for r in steps:
        lines.append(f"| {r['batch']} | {r['free_ms']:.2f} | {r['grammar_ms']:.2f} | "
                     f"{r['ratio']:.3f} | {r['steps_timed'][0]} / {r['steps_timed'][1]} |")
    lines += ["", "## Grammar compile time (cold compiler, median)", "",
              "| grammar | median (ms) | min (ms) |", "|---|---:|---:|"]
    for r in result["compile"]:
        lines.append(f"| {r['grammar']} | {r['compile_ms']:.1f} | {r['min_ms']:.1f} |")
    lines += ["", "## Bitmask pieces (nested schema, inside a string)", "",
              "| batch | fill on host (ms) | apply, torch op (ms) | apply, xgrammar kernel (ms) |",
              "|---:|---:|---:|---:|"]
    for r in result["pieces"]:
        lines.append(f"| {r['batch']} | {r['fill_ms']:.3f} | {r['apply_torch_ms']:.3f} | "
                     f"{r['apply_xgrammar_ms']:.3f} |")
    (args.out / "bench_structured.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
