"""CPU benchmark of the API process under many concurrent streams, at GPU-like token rates.

    python benchmarks/bench_api_streams.py --out benchmarks/results/api_streams_cpu.md
        [--streams 256] [--step-ms 8] [--seconds 20] [--warmup 5] [--clients 2]
        [--variant LABEL=PYTHONPATH ...] [--repeats 1] [--profile DIR]

What runs, per variant (a flatout source tree; default: the one this script imports):
  - the API process: the real `flatout serve` (uvicorn, FastAPI app, engine client, output
    processor, SSE encoder) on the demo model, except that the engine core process it spawns
    runs `fake_core` below instead of the model: it speaks the real messages (messages.py) over
    the real pipes, and every `--step-ms` emits one token (from the demo corpus) for each running
    request, up to `--streams` at once; a request ends at its max_tokens;
  - `--clients` client processes (httpx, asyncio), `--streams` in all, each stream sending
    /v1/completions requests back to back (prompt 512 +- 90 % token ids, max_tokens 256 +- 90 %,
    ignore_eos, streamed), as `flatout bench` does.
Measured over `--seconds` after `--warmup`:
  - ITL seen by clients (gaps between chunks that carry text): mean, P50, P99, max;
  - output tokens/s received by clients against tokens/s emitted by the fake core (chunks
    with text, and the tokens they carried: the text received over the corpus's characters per
    token, as a stream that fell behind gets several tokens in a chunk) and the event loop's
    CPU per token delivered;
  - lag: from the fake core emitting a request's last token to its client receiving it (P50/P99);
  - the API process's CPU (% of one core: the event-loop thread, the pipe-reader thread, all),
    the fake core's and the clients' (so a reader sees which one is the limit);
  - event-loop lag: a probe coroutine in the API process sleeps 5 ms at a time; its wake-up delay
    past the 5 ms (P50/P99/max); and the garbage collector's pauses (count, total, max).
`--profile DIR`: cProfile of the API process's event-loop thread over the measured window, the
top functions by own time written to DIR/<label>.txt.

Writes the table (markdown) to --out; the machine's load average goes with it.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
PROBE_INTERVAL = 0.005


# -- the fake engine core (runs in the process the API server spawns) -------------------------
def fake_core(args: Any, inbox: Any, outbox: Any) -> None:
    """Stands in for `run_engine_core`: the same messages, one token per running request per
    step, no model. Settings come from the environment (FAKE_STEP_S, FAKE_LOG)."""
    import dataclasses

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from flatout.demo import ASSETS
    from flatout.engine.messages import (
        AbortRequest,
        CoreOutputs,
        CoreReady,
        CoreStats,
        EngineCoreOutput,
        EngineCoreRequest,
        FinishReason,
        Shutdown,
    )
    from flatout.models.registry import resolve_model
    from flatout.tokenizers import load_tokenizer

    step_s = float(os.environ["FAKE_STEP_S"])
    log = open(os.environ["FAKE_LOG"], "w")  # noqa: SIM115  # lives as long as the process
    model_config = resolve_model(args, "cpu")
    config = args.resolve(model_config)
    cache = dataclasses.replace(config.cache, num_blocks=config.cache.num_blocks or 4096)
    max_seqs = config.scheduler.max_num_seqs
    outbox.send(CoreReady(model_config, cache, "cpu (fake core)", 0.0))
    tok = load_tokenizer(ASSETS)
    corpus = tok.encode((ASSETS / "corpus.txt").read_text(), add_special_tokens=False)
    waiting: list[EngineCoreRequest] = []
    running: dict[str, list[Any]] = {}  # id -> [request, tokens emitted, corpus position]
    steps = 0
    next_step = time.monotonic()
    while True:
        timeout = max(0.0, next_step - time.monotonic()) if running or waiting else None
        if inbox.poll(timeout):
            while True:
                msg = inbox.recv()
                if isinstance(msg, Shutdown):
                    log.close()
                    return
                if isinstance(msg, EngineCoreRequest):
                    waiting.append(msg)
                elif isinstance(msg, AbortRequest):
                    running.pop(msg.request_id, None)
                    waiting = [r for r in waiting if r.request_id != msg.request_id]
                if not inbox.poll(0):
                    break
            if not running and not waiting:
                outbox.send(CoreOutputs([], CoreStats(num_blocks=cache.num_blocks)))
            continue
        if not running and not waiting:
            continue
        now = time.monotonic()
        while waiting and len(running) < max_seqs:
            req = waiting.pop(0)
            running[req.request_id] = [req, 0, random.randrange(len(corpus))]
        outputs = []
        finished = []
        for rid, entry in running.items():
            req, emitted, pos = entry
            token = corpus[pos % len(corpus)]
            entry[1] = emitted = emitted + 1
            entry[2] = pos + 1
            done = emitted >= req.max_tokens
            outputs.append(EngineCoreOutput(
                rid, 0, [token], finish_reason=FinishReason.LENGTH if done else None,
                num_cached_tokens=0,
                queue_time=now - req.arrival_time if emitted == 1 else None))
            if done:
                finished.append(rid)
        for rid in finished:
            del running[rid]
        steps += 1
        outbox.send(CoreOutputs(outputs, CoreStats(
            num_running=len(running), num_waiting=len(waiting), num_blocks=cache.num_blocks,
            num_steps=steps, step_batch_size=len(outputs))))
        sent = time.monotonic()
        log.write(f"S {sent:.6f} {len(outputs)} {now - next_step:.6f}\n")
        for rid in finished:
            log.write(f"F {rid} {sent:.6f}\n")
        log.flush()
        next_step += step_s
        if next_step < sent:  # the core itself fell behind its clock: start again from now
            next_step = sent


# -- the API process -----------------------------------------------------------------------------
def run_server(ns: argparse.Namespace) -> None:
    """`flatout serve` with the fake core, an event-loop probe, GC timing and (optionally) a
    profile of the event-loop thread over the measured window."""
    import cProfile
    import gc
    import pstats

    import flatout.engine.async_client as async_client
    from flatout.cli import main as cli_main

    async_client.run_engine_core = fake_core  # type: ignore[assignment]  # benchmark only
    lags: list[float] = []
    gc_pauses: list[float] = []
    gc_start = [0.0]
    gc_full: list[float] = []  # the pauses of the oldest generation's collections

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            gc_pauses.append(time.perf_counter() - gc_start[0])
            if info["generation"] == 2:
                gc_full.append(gc_pauses[-1])

    gc.callbacks.append(on_gc)
    profiler = cProfile.Profile() if ns.profile_out else None
    original_attach = async_client.AsyncEngineClient.attach

    async def probe() -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(PROBE_INTERVAL)
            lags.append(loop.time() - t - PROBE_INTERVAL)

    def start_window() -> None:
        lags.clear()
        gc_pauses.clear()
        gc_full.clear()
        if profiler is not None:
            profiler.enable()

    def end_window() -> None:
        if profiler is not None:
            profiler.disable()
            stats = pstats.Stats(profiler)
            stats.dump_stats(ns.profile_out + ".pstats")
            with open(ns.profile_out, "w") as f:
                pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(40)
                pstats.Stats(profiler, stream=f).sort_stats("cumulative").print_stats(40)
        partial = Path(ns.probe_out + ".partial")
        partial.write_text(json.dumps({"lags": lags, "gc_pauses": gc_pauses,
                                       "gc_full": gc_full, "gc_tracked": len(gc.get_objects()),
                                       "gc_frozen": gc.get_freeze_count()}))
        partial.rename(ns.probe_out)

    def window(loop: asyncio.AbstractEventLoop) -> None:
        """Open and close the measured window at the times the orchestrator writes into the
        control file. Timed from a thread, not signalled: a saturated loop would take a signal
        late, or drop it when its wake-up pipe is full; call_soon_threadsafe's callbacks run
        at the loop's next iteration either way."""
        control = Path(ns.control)
        while not control.exists():
            time.sleep(0.05)
        time.sleep(0.05)
        t_start, t_end = map(float, control.read_text().split())
        time.sleep(max(0.0, t_start - time.monotonic()))
        loop.call_soon_threadsafe(start_window)
        time.sleep(max(0.0, t_end - time.monotonic()))
        loop.call_soon_threadsafe(end_window)

    tasks: list[asyncio.Task[None]] = []  # the loop holds its tasks weakly

    def attach(self: Any, loop: asyncio.AbstractEventLoop) -> None:
        original_attach(self, loop)
        tasks.append(loop.create_task(probe()))
        threading.Thread(target=window, args=(loop,), daemon=True).start()

    async_client.AsyncEngineClient.attach = attach  # type: ignore[method-assign]
    sys.exit(cli_main([
        "serve", "--host", "127.0.0.1", "--port", str(ns.port), "--max-model-len", "2048",
        "--max-num-seqs", str(ns.streams), "--num-kv-blocks", "4096",
        "--served-model-name", "demo", "--uvicorn-log-level", "warning"]))


# -- the clients ---------------------------------------------------------------------------------
def run_client(ns: argparse.Namespace) -> None:
    import httpx

    rng = random.Random(ns.seed)
    itls: list[float] = []
    finishes: list[tuple[str, float]] = []
    tokens = [0]
    chars = [0]  # of text received in the window: tokens delivered, whether joined or not
    cpu: dict[str, float] = {}
    url = f"{ns.url}/v1/completions"

    errors: list[str] = []

    async def stream(client: httpx.AsyncClient) -> None:
        while time.monotonic() < ns.t_end:
            try:
                await one(client)
            except (httpx.HTTPError, RuntimeError) as e:
                errors.append(f"{type(e).__name__}: {e}"[:200])
                await asyncio.sleep(0.1)

    async def one(client: httpx.AsyncClient) -> None:
        prompt_len = max(1, int(512 * rng.uniform(0.1, 1.9)))
        out_len = max(2, int(256 * rng.uniform(0.1, 1.9)))
        body = {"model": "demo", "prompt": [rng.randrange(10, 4000) for _ in range(prompt_len)],
                "max_tokens": out_len, "ignore_eos": True, "stream": True,
                "temperature": 0.0}
        last = None
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"HTTP {resp.status_code}: {await resp.aread()!r}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                now = time.monotonic()
                data = json.loads(line[5:])
                choices = data.get("choices") or []
                if not choices:
                    continue
                in_window = ns.t_start <= now <= ns.t_end
                if choices[0].get("text"):
                    if last is not None and in_window:
                        itls.append(now - last)
                    last = now
                    if in_window:
                        tokens[0] += 1  # chunks with text: one per token unless joined
                        chars[0] += len(choices[0]["text"])
                if choices[0].get("finish_reason") is not None and in_window:
                    finishes.append((data["id"] + "-0", now))

    async def clock() -> None:
        await asyncio.sleep(max(0.0, ns.t_start - time.monotonic()))
        cpu["start"] = time.process_time()
        await asyncio.sleep(max(0.0, ns.t_end - time.monotonic()))
        cpu["end"] = time.process_time()

    async def main() -> None:
        limits = httpx.Limits(max_connections=ns.streams, max_keepalive_connections=ns.streams)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60.0)) as client:
            tasks = [asyncio.create_task(stream(client)) for _ in range(ns.streams)]
            await clock()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())
    Path(ns.client_out).write_text(json.dumps({
        "itls": itls, "finishes": finishes, "tokens": tokens[0], "chars": chars[0],
        "errors": errors,
        "cpu_s": cpu.get("end", 0.0) - cpu.get("start", 0.0)}))


# -- the orchestrator ----------------------------------------------------------------------------
@functools.cache
def _chars_per_token() -> float:
    """Characters per token of the demo corpus, which the fake core's tokens come from (so the
    text a client received counts the tokens it carried, also where several came as one)."""
    from flatout.demo import ASSETS
    from flatout.tokenizers import load_tokenizer

    tok = load_tokenizer(ASSETS)
    text = (ASSETS / "corpus.txt").read_text()
    ids = tok.encode(text, add_special_tokens=False)
    return len(tok.decode(ids)) / len(ids)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q / 100 * len(s)))]


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("server did not become healthy")


def _cpu(pid: int) -> dict[str, float]:
    """CPU seconds of process `pid`: all, its main (event-loop) thread, and its children."""
    import psutil

    p = psutil.Process(pid)
    t = p.cpu_times()
    main = next((th.user_time + th.system_time for th in p.threads() if th.id == pid), 0.0)
    kids = sum(c.cpu_times().user + c.cpu_times().system for c in p.children(recursive=True))
    return {"all": t.user + t.system, "main": main, "children": kids}


def run_variant(ns: argparse.Namespace, label: str, pythonpath: str, tmp: Path) -> dict[str, Any]:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": pythonpath, "FAKE_STEP_S": str(ns.step_ms / 1000),
           "FAKE_LOG": str(tmp / f"{label}.core.log")}
    probe_out = tmp / f"{label}.probe.json"
    server_cmd = [sys.executable, str(HERE), "--role", "server", "--port", str(port),
                  "--streams", str(ns.streams), "--probe-out", str(probe_out),
                  "--control", str(tmp / f"{label}.control")]
    if ns.profile:
        ns.profile.mkdir(parents=True, exist_ok=True)
        server_cmd += ["--profile-out", str(ns.profile / f"{label}.txt")]
    server_log = open(tmp / f"{label}.server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(server_cmd, env=env, stdout=server_log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, server)
        t_start = time.monotonic() + ns.warmup
        t_end = t_start + ns.seconds
        (tmp / f"{label}.control").write_text(f"{t_start!r} {t_end!r}")
        per = [ns.streams // ns.clients + (i < ns.streams % ns.clients) for i in range(ns.clients)]
        clients = [subprocess.Popen(
            [sys.executable, str(HERE), "--role", "client", "--url", url, "--streams", str(k),
             "--seed", str(i), "--t-start", repr(t_start), "--t-end", repr(t_end),
             "--client-out", str(tmp / f"{label}.client{i}.json")], env=env)
            for i, k in enumerate(per)]
        time.sleep(max(0.0, t_start - time.monotonic()))
        cpu0 = _cpu(server.pid)
        load0 = os.getloadavg()[0]
        time.sleep(max(0.0, t_end - time.monotonic()))
        cpu1 = _cpu(server.pid)
        load1 = os.getloadavg()[0]
        for c in clients:
            c.wait(timeout=120)
        for _ in range(600):
            if probe_out.exists():
                break
            time.sleep(0.1)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    results = [json.loads((tmp / f"{label}.client{i}.json").read_text())
               for i in range(ns.clients)]
    itls = [x for r in results for x in r["itls"]]
    received = {rid: t for r in results for rid, t in r["finishes"]}
    core_tokens, late, emitted_at = 0, [], {}
    for line in (tmp / f"{label}.core.log").read_text().splitlines():
        kind, *rest = line.split()
        if kind == "S" and t_start <= float(rest[0]) <= t_end:
            core_tokens += int(rest[1])
            late.append(float(rest[2]))
        elif kind == "F":
            emitted_at[rest[0]] = float(rest[1])
    errors = [e for r in results for e in r["errors"]]
    if errors:
        print(f"{label}: {len(errors)} client errors, e.g. {errors[:3]}", file=sys.stderr)
    finish_lag = [received[r] - emitted_at[r] for r in received if r in emitted_at]
    probe = json.loads(probe_out.read_text())
    span = ns.seconds
    return {
        "label": label,
        "itl_mean": sum(itls) / len(itls) * 1e3 if itls else float("nan"),
        "itl_p50": _pct(itls, 50) * 1e3, "itl_p99": _pct(itls, 99) * 1e3,
        "itl_max": max(itls, default=float("nan")) * 1e3,
        "client_tok_s": sum(r["tokens"] for r in results) / span,
        # tokens delivered: the text received over the corpus's characters per token
        "delivered_tok_s": sum(r["chars"] for r in results) / span / _chars_per_token(),
        "core_tok_s": core_tokens / span,
        "core_late_p99": _pct(late, 99) * 1e3,
        "lag_p50": _pct(finish_lag, 50) * 1e3, "lag_p99": _pct(finish_lag, 99) * 1e3,
        "api_cpu": (cpu1["all"] - cpu0["all"]) / span * 100,
        "loop_cpu": (cpu1["main"] - cpu0["main"]) / span * 100,
        "core_cpu": (cpu1["children"] - cpu0["children"]) / span * 100,
        "client_cpu": [r["cpu_s"] / span * 100 for r in results],
        "probe_p50": _pct(probe["lags"], 50) * 1e3, "probe_p99": _pct(probe["lags"], 99) * 1e3,
        "probe_max": max(probe["lags"], default=float("nan")) * 1e3,
        "gc_n": len(probe["gc_pauses"]), "gc_total": sum(probe["gc_pauses"]) * 1e3,
        "gc_max": max(probe["gc_pauses"], default=0.0) * 1e3,
        "gc_full_n": len(probe["gc_full"]), "gc_full_max": max(probe["gc_full"], default=0.0) * 1e3,
        "load": (load0 + load1) / 2, "errors": len(errors),
        "gc_tracked": probe["gc_tracked"], "gc_frozen": probe["gc_frozen"],
    }


COLUMNS = (
    ("variant", lambda r: r["label"]),
    ("ITL mean / P50 / P99 / max (ms)",
     lambda r: f"{r['itl_mean']:.1f} / {r['itl_p50']:.1f} / {r['itl_p99']:.1f} / "
               f"{r['itl_max']:.0f}"),
    ("chunks/s to clients / core tok/s",
     lambda r: f"{r['client_tok_s']:.0f} / {r['core_tok_s']:.0f}"),
    ("tok/s delivered (text / chars per token)", lambda r: f"{r['delivered_tok_s']:.0f}"),
    ("loop CPU per token delivered (us)",
     lambda r: f"{r['loop_cpu'] * 1e4 / r['delivered_tok_s']:.0f}"),
    ("last-token lag P50 / P99 (ms)", lambda r: f"{r['lag_p50']:.1f} / {r['lag_p99']:.1f}"),
    ("API CPU all / loop thread (%)", lambda r: f"{r['api_cpu']:.0f} / {r['loop_cpu']:.0f}"),
    ("loop lag P50 / P99 / max (ms)",
     lambda r: f"{r['probe_p50']:.1f} / {r['probe_p99']:.1f} / {r['probe_max']:.0f}"),
    ("GC pauses n / total / max (ms); full n / max",
     lambda r: f"{r['gc_n']} / {r['gc_total']:.0f} / {r['gc_max']:.1f}; {r['gc_full_n']} / "
               f"{r['gc_full_max']:.0f}"),
    ("core CPU / late P99", lambda r: f"{r['core_cpu']:.0f} % / {r['core_late_p99']:.1f} ms"),
    ("client CPU (%)", lambda r: " + ".join(f"{c:.0f}" for c in r["client_cpu"])),
    ("load avg", lambda r: f"{r['load']:.1f}"),
)


def table(rows: list[dict[str, Any]]) -> list[str]:
    return ["| " + " | ".join(name for name, _ in COLUMNS) + " |",
            "|" + "---|" * len(COLUMNS),
            *("| " + " | ".join(fmt(r) for _, fmt in COLUMNS) + " |" for r in rows)]


def orchestrate(ns: argparse.Namespace) -> None:
    variants = [v.split("=", 1) for v in ns.variant] or [
        ["this tree", str(HERE.parent.parent)]]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for rep in range(ns.repeats):
            for label, path in variants:
                name = label if ns.repeats == 1 else f"{label} #{rep + 1}"
                row = run_variant(ns, name.replace(" ", "_").replace("#", ""), path, Path(d))
                row["label"] = name
                print(json.dumps(row), flush=True)
                rows.append(row)
    lines = [
        f"API process under {ns.streams} concurrent streams, fake engine core at one token per "
        f"running request every {ns.step_ms:g} ms ({ns.streams * 1000 / ns.step_ms:,.0f} tok/s "
        f"at full batch), demo model/tokenizer, /v1/completions streamed, prompt 512 +- 90 % "
        f"token ids, max_tokens 256 +- 90 %, {ns.clients} httpx client processes; measured "
        f"over {ns.seconds:g} s after {ns.warmup:g} s of warm-up. CPU in % of one core.",
        "",
        f"    python benchmarks/bench_api_streams.py --streams {ns.streams} --step-ms "
        f"{ns.step_ms:g} --seconds {ns.seconds:g} --warmup {ns.warmup:g} --clients "
        f"{ns.clients} --repeats {ns.repeats}" + "".join(
            f" --variant '{v}'" for v in ns.variant),
        "",
        *table(rows),
        "",
        f"Machine: {os.cpu_count()} cores, load average during the runs in the last column "
        f"(other jobs shared it).",
    ]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if ns.out is not None:
        ns.out.parent.mkdir(parents=True, exist_ok=True)
        ns.out.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="markdown file for the table")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=8.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--variant", action="append", default=[],
                    help="LABEL=PYTHONPATH: a flatout tree to serve (repeat to compare)")
    ap.add_argument("--profile", type=Path, help="folder for cProfile tables of the API loop")
    # internal: the server and client processes
    ap.add_argument("--role", choices=("server", "client"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--probe-out", help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", help=argparse.SUPPRESS)
    ap.add_argument("--control", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--t-start", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--t-end", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--client-out", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.role == "server":
        run_server(ns)
    elif ns.role == "client":
        run_client(ns)
    else:
        orchestrate(ns)


if __name__ == "__main__":
    main()
