"""`flatout` command line: generate, info (serve and bench come with the server)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

from flatout.config import EngineArgs

_HELP = {
    "model": "checkpoint folder, or a preset name with --load-format dummy (default: demo model)",
    "dtype": "auto, float32, bfloat16 or float16 (auto: bf16 on GPU, fp32 on CPU)",
    "kv_cache_memory": "bytes for the KV cache (CPU default 1 GiB; GPU: sized from free memory)",
    "num_kv_blocks": "fix the KV cache size in blocks",
    "load_format": "auto (safetensors) or dummy (random weights, real shapes)",
    "peak_memory_bandwidth": "device copy bandwidth in bytes/s for MBU (default: measured)",
    "peak_flops": "device matmul FLOP/s in the model's dtype for MFU (default: measured)",
    "disable_custom_all_reduce": "tensor parallel: all-reduce over NCCL only, not the fused "
                                 "one-shot all-reduce + add + RMSNorm kernel over NVLink",
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field, named as vLLM's (--max-num-seqs, ...)."""
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default,
                help=_HELP.get(f.name),
            )
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=_HELP.get(f.name))


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**{name: getattr(ns, name) for name in EngineArgs.field_names()})


def _cmd_generate(ns: argparse.Namespace) -> int:
    from flatout import LLM

    llm = LLM(**dataclasses.asdict(engine_args_from(ns)))
    params = llm.engine.default_sampling_params(
        max_tokens=ns.max_tokens,
        **({"temperature": ns.temperature} if ns.temperature is not None else {}),
        **({"seed": ns.sample_seed} if ns.sample_seed is not None else {}),
    )
    if ns.chat:
        outs = llm.chat([{"role": "user", "content": p} for p in ns.prompt[:1]], params)
    else:
        outs = llm.generate(list(ns.prompt), params)
    for out in outs:
        print(out.text)
    return 0


def _cmd_info(ns: argparse.Namespace) -> int:
    from flatout.models.registry import model_info_lines, resolve_model_config

    model = ns.model
    if model is None:
        from flatout.demo import demo_model_path

        model = demo_model_path()
    cfg = resolve_model_config(
        model, dtype=ns.dtype, device_type=ns.device_type, max_model_len=ns.max_model_len,
        load_format=ns.load_format,
    )
    for line in model_info_lines(cfg):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flatout", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate offline (no server) and print the text")
    add_engine_args(gen)
    gen.add_argument("prompt", nargs="+", help="prompt text (several: one completion each)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=None)
    gen.add_argument("--sample-seed", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.set_defaults(func=_cmd_generate)

    info = sub.add_parser("info", help="parameters, weight and KV-cache bytes, from the config")
    info.add_argument("--model", default=None)
    info.add_argument("--dtype", default="auto")
    info.add_argument("--device-type", default="cuda", choices=["cuda", "cpu"],
                      help="the device the dtype is resolved for (auto dtype: bf16 on cuda)")
    info.add_argument("--max-model-len", type=int, default=None)
    info.add_argument("--load-format", default="auto")
    info.set_defaults(func=_cmd_info)

    from flatout.server.serve import add_serve_parser

    add_serve_parser(sub)

    from flatout.plan import add_plan_parser

    add_plan_parser(sub)

    from flatout.bench.cli import add_bench_parser
    from flatout.monitor.top import add_top_parser

    add_bench_parser(sub)
    add_top_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns))
    except (ValueError, FileNotFoundError, NotImplementedError) as e:
        print(f"flatout: error: {e}", file=sys.stderr)
        return 2




if __name__ == "__main__":
    sys.exit(main())
