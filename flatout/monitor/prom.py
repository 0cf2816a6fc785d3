"""Reading a server's Prometheus /metrics: samples by name and labels, rates between two scrapes,
and quantiles of a histogram's observations between two scrapes (as PromQL's histogram_quantile).

Names are looked up under the server's prefix: `flatout:`, `vllm:` or `sglang:`, whichever the
scrape has (`Scrape.prefix`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIXES = ("flatout:", "vllm:", "sglang:")


@dataclass
class Scrape:
    t: float  # time.perf_counter() when it was read
    samples: dict[str, list[tuple[dict[str, str], float]]]  # sample name -> (labels, value)

    @classmethod
    def parse(cls, text: str, t: float | None = None) -> Scrape:
        samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                samples.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
        return cls(time.perf_counter() if t is None else t, samples)

    @property
    def prefix(self) -> str:
        for p in PREFIXES:
            if any(name.startswith(p) for name in self.samples):
                return p
        return "flatout:"

    def series(self, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
        full = name if ":" in name else self.prefix + name
        return [(labels, v) for labels, v in self.samples.get(full, [])
                if all(labels.get(k) == want for k, want in match.items())]

    def value(self, name: str, **match: str) -> float | None:
        """The sum over the matching series, None when there is none."""
        found = self.series(name, **match)
        return sum(v for _, v in found) if found else None

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: dict[str, float] = {}
        for labels, v in self.series(name):
            key = labels.get(label, "")
            out[key] = out.get(key, 0.0) + v
        return out

    def buckets(self, name: str) -> list[tuple[float, float]]:
        """Cumulative (upper bound, count) of histogram `name`, summed over other labels."""
        counts: dict[float, float] = {}
        for labels, v in self.series(name + "_bucket"):
            le = float(labels["le"])
            counts[le] = counts.get(le, 0.0) + v
        return sorted(counts.items())


def rate(now: Scrape, then: Scrape | None, name: str, **match: str) -> float | None:
    """Per-second increase of a counter between two scrapes."""
    if then is None or now.t <= then.t:
        return None
    a, b = now.value(name, **match), then.value(name, **match)
    if a is None or b is None:
        return None
    return max(0.0, a - b) / (now.t - then.t)


def histogram_quantile(q: float, now: list[tuple[float, float]],
                       then: list[tuple[float, float]] | None = None) -> float | None:
    """The q-quantile of the observations made between two scrapes of one histogram, linear
    within the bucket it falls in; None without observations."""
    base = dict(then or [])
    cum = [(le, c - base.get(le, 0.0)) for le, c in now]
    if not cum or cum[-1][1] <= 0:
        return None
    target = q * cum[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in cum:
        if c >= target:
            if math.isinf(le):  # above the last finite bound: report that bound
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (target - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def fetch(url: str, client: httpx.Client | None = None, timeout: float = 5.0) -> Scrape:
    """GET {url}/metrics and parse it."""
    target = url.rstrip("/") + "/metrics"
    r = client.get(target) if client is not None else httpx.get(target, timeout=timeout)
    r.raise_for_status()
    return Scrape.parse(r.text)
