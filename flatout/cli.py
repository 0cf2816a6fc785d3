"""flatout: an LLM inference server, and tools to size, run and load-test models.

Building the parser imports no torch (see flatout.cli_args): each command's code is imported
when that command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable
from typing import NoReturn

from flatout import cli_args

Run = Callable[[argparse.Namespace], int]


def _cmd_generate(ns: argparse.Namespace) -> int:
    from flatout import LLM

    llm = LLM(**dataclasses.asdict(cli_args.engine_args_from(ns)))
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
        load_format=ns.load_format, quantization=ns.quantization,
        quantize_lm_head=ns.quantize_lm_head,
    )
    for line in model_info_lines(cfg, ns.kv_cache_dtype):
        print(line)
    return 0


def _lazy(module: str, name: str) -> Run:
    """The command `module.name`, imported when it runs."""

    def run(ns: argparse.Namespace) -> int:
        func: Run = getattr(importlib.import_module(module), name)
        return func(ns)

    return run


# name, one-line help, its arguments, what runs it
_COMMANDS: list[tuple[str, str, Callable[[argparse.ArgumentParser], None], Run]] = [
    ("serve", "serve the OpenAI-compatible API over HTTP",
     cli_args.add_serve_args, _lazy("flatout.server.serve", "run_serve")),
    ("generate", "generate offline (no server) and print the text",
     cli_args.add_generate_args, _cmd_generate),
    ("info", "parameters, weight and KV-cache bytes from a model's config",
     cli_args.add_info_args, _cmd_info),
    ("plan", "memory plan from the config: will a model fit these GPUs?",
     cli_args.add_plan_args, _lazy("flatout.plan", "run_plan")),
    ("bench", "load-test an OpenAI-compatible server (or --compare two results)",
     cli_args.add_bench_args, _lazy("flatout.bench.cli", "run_bench")),
    ("top", "live dashboard of a running server (from its /metrics)",
     cli_args.add_top_args, _lazy("flatout.monitor.top", "run_top")),
]


def _version() -> str:
    import flatout

    return f"flatout {flatout.__version__}"


class _VersionAction(argparse.Action):
    """--version: print `flatout X.Y.Z` and exit 0 (the version is read only when asked)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(_version())
        parser.exit()


class _CommandParser(argparse.ArgumentParser):
    """A command's parser: a bad argument is one line on stderr (exit 2), not the whole usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (`{self.prog} --help` lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flatout", description=__doc__.split("\n\n")[0],
        epilog="`flatout COMMAND --help` lists a command's options.")
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_CommandParser)
    for name, help_text, add_args, run in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(func=run)
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
