"""Per-request timing records and the serving metrics over them, defined as vLLM's `bench serve`.

- TTFT: from sending the request to the first streamed chunk that carries generated text;
- ITL: the gaps between successive chunks that carry text, pooled over all requests;
- TPOT, per request: (E2E latency - TTFT) / (output tokens - 1), for requests with > 1 token;
- E2E latency (E2EL): from sending the request to the end of its stream.
Each is reported as mean, median, standard deviation, P90 and P99 (linear interpolation between
the closest ranks, as numpy's default), in milliseconds. Throughputs divide by the run's duration
(first request sent to last response finished). Only successful requests count.

Goodput (requests/s) counts the successful requests within every given SLO (`ttft:MS tpot:MS
e2el:MS`); a request with at most one output token has TPOT 0 there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

SLO_KEYS = ("ttft", "tpot", "e2el")
PERCENTILES = (90, 99)


@dataclass
class RequestRecord:
    """One request's timings, in seconds; `start` is relative to the run's start."""

    index: int
    prompt_len: int  # prompt tokens (the server's usage when it reports it)
    expected_output_len: int | None
    start: float = 0.0
    success: bool = False
    ttft: float = 0.0
    e2el: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0  # the server's usage, else the number of chunks with text
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens <= 1:
            return None
        return (self.e2el - self.ttft) / (self.output_tokens - 1)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot"] = self.tpot
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> RequestRecord:
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


def distribution(values_s: list[float]) -> dict[str, float]:
    """mean, median, std, p90, p99 of seconds, in milliseconds (0 for no values, as vLLM)."""
    if not values_s:
        return {"mean": 0.0, "median": 0.0, "std": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    a = np.asarray(values_s, dtype=np.float64) * 1e3
    out = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(a, p))
    return out


def parse_slo(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 0.5, "tpot": 0.05} (seconds)."""
    slo: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--slo takes KEY:MS with KEY one of {', '.join(SLO_KEYS)} "
                             f"(got {item!r})")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--slo {item!r}: {value!r} is not a number of ms") from None
        if ms <= 0:
            raise ValueError(f"--slo {item!r}: the limit must be > 0 ms")
        slo[key] = ms / 1e3
    return slo


def is_good(r: RequestRecord, slo: dict[str, float]) -> bool:
    values = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2el": r.e2el}
    return r.success and all(values[k] <= limit for k, limit in slo.items())


def summarize(records: list[RequestRecord], duration: float,
              slo: dict[str, float] | None = None) -> dict[str, Any]:
    ok = [r for r in records if r.success]
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = duration if duration > 0 else float("nan")
    out: dict[str, Any] = {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(ok) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "ttft_ms": distribution([r.ttft for r in ok]),
        "tpot_ms": distribution([t for r in ok if (t := r.tpot) is not None]),
        "itl_ms": distribution([gap for r in ok for gap in r.itl]),
        "e2el_ms": distribution([r.e2el for r in ok]),
    }
    if slo:
        good = sum(1 for r in ok if is_good(r, slo))
        out["slo_ms"] = {k: v * 1e3 for k, v in slo.items()}
        out["good_requests"] = good
        out["goodput"] = good / dur
    return out


def token_times(records: list[RequestRecord]) -> list[tuple[float, float]]:
    """(time since the run's start, tokens) at each chunk with text: a request's output tokens
    spread evenly over its chunks (for throughput over time)."""
    out: list[tuple[float, float]] = []
    for r in records:
        if not r.success or r.output_tokens <= 0:
            continue
        times = [r.start + r.ttft]
        for gap in r.itl:
            times.append(times[-1] + gap)
        per_chunk = r.output_tokens / len(times)
        out.extend((t, per_chunk) for t in times)
    return out
