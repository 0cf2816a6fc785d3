"""/health latency while flatout builds and sends one large non-streamed response (issue 20):
n=128 chat samples x max_tokens x 20 top logprobs on the demo model, a /health GET on a fresh
connection every 20 ms from a process of its own, for each size in --max-tokens.

    python benchmarks/bench_large_response.py --max-tokens 8 400 1000 --out FILE.md

Prints (and writes) one row per size: response MB, request seconds, /health worst / P99 / P50
and the samples over 30 ms, with the server's RSS after the request.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx


def _probe(host: str, port: int, interval: float, stop: Any, out: Any) -> None:
    samples: list[tuple[float, float]] = []
    while not stop.is_set():
        start = time.monotonic()
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                while s.recv(65536):
                    pass
        except OSError:
            pass
        samples.append((start, time.monotonic() - start))
        stop.wait(interval)
    out.send(samples)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[8, 400, 1000])
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--top-logprobs", type=int, default=20)
    ap.add_argument("--port", type=int, default=8131)
    ap.add_argument("--out", type=Path)
    ns = ap.parse_args()
    longest = max(ns.max_tokens)
    cmd = [sys.executable, "-m", "flatout", "serve", "--port", str(ns.port), "--max-model-len",
           str(longest + 100), "--max-num-seqs", str(ns.n), "--num-kv-blocks",
           str(ns.n * (longest + 100) // 16 + 64), "--served-model-name", "demo"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{ns.port}"
    rows = []
    try:
        assert server.stdout is not None
        for line in server.stdout:  # the banner's last line says the startup time
            if line.lstrip().startswith("startup"):
                break
        for max_tokens in ns.max_tokens:
            body = {"model": "demo",
                    "messages": [{"role": "user", "content": "Tell me everything"}],
                    "n": ns.n, "max_tokens": max_tokens, "ignore_eos": True,
                    "temperature": 1.0, "seed": 3, "logprobs": True,
                    "top_logprobs": ns.top_logprobs}
            stop = mp.Event()
            recv, send = mp.Pipe(duplex=False)
            probe = mp.Process(target=_probe, args=("127.0.0.1", ns.port, 0.02, stop, send))
            probe.start()
            time.sleep(0.5)
            t0 = time.monotonic()
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=1800)
            seconds = time.monotonic() - t0
            stop.set()
            samples = recv.recv()
            probe.join()
            assert r.status_code == 200, r.text[:300]
            lat = sorted(d for _, d in samples)
            slow = [(round(t - t0, 2), round(d * 1000)) for t, d in samples if d > 0.03]
            rows.append({
                "max_tokens": max_tokens, "MB": len(r.content) / 1e6, "seconds": seconds,
                "worst_ms": lat[-1] * 1000, "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1000,
                "p50_ms": lat[len(lat) // 2] * 1000, "samples": len(lat), "over_30ms": slow,
                "server_rss_mb": _rss_mb(server.pid)})
            del r
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(60)
    load = os.getloadavg()
    lines = [
        f"/health every 20 ms while one chat request of n={ns.n} x max_tokens x "
        f"{ns.top_logprobs} top logprobs is generated, built and sent (demo model, CPU; "
        f"{os.cpu_count()} cores, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}).",
        "", "    " + " ".join(["python", *sys.argv]), "",
        "| max_tokens | response MB | request s | /health worst / P99 / P50 (ms) | samples "
        "| > 30 ms (s from start, ms) | server RSS after (MB) |",
        "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(
            f"| {row['max_tokens']} | {row['MB']:.1f} | {row['seconds']:.1f} | "
            f"{row['worst_ms']:.0f} / {row['p99_ms']:.0f} / {row['p50_ms']:.0f} | "
            f"{row['samples']} | {row['over_30ms'] or '-'} | {row['server_rss_mb']:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if ns.out is not None:
        ns.out.write_text(re.sub(r"\n{3,}", "\n\n", text))


if __name__ == "__main__":
    main()
