"""A large non-streamed response, n=128 x max_tokens=400 x 20 top logprobs (about 87 MB of
JSON), is built and serialised off the event loop: /health answers in < 100 ms all the while
(22-44 ms worst measured on the 2-core CPU), and the response is complete and well formed. The
issue's 200 MB (max_tokens=1000, ~130 s here) is measured by benchmarks/bench_large_response.py
(results/large_response_cpu.md: 71 ms worst); the test runs at 87 MB to keep its time and its
margin under the bound on a loaded machine."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.reliability.attackers import HealthProbe
from tests.reliability.harness import CHAT
from tests.server.server_process import ServerProcess

N, MAX_TOKENS, TOP = 128, 400, 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(["--max-model-len", "512", "--max-num-seqs", str(N), "--num-kv-blocks",
                       "4608", "--served-model-name", "demo"],
                      tmp_path_factory.mktemp("large") / "serve.log")
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.slow
def test_large_response_leaves_health_responsive(server: ServerProcess) -> None:
    u = urlsplit(server.url)
    assert u.hostname is not None and u.port is not None
    body = {"model": "demo", "messages": [{"role": "user", "content": "Tell me everything"}],
            "n": N, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 1.0,
            "seed": 3, "logprobs": True, "top_logprobs": TOP}
    with HealthProbe(u.hostname, u.port, interval=0.02) as probe:
        r = httpx.post(server.url + CHAT, json=body, timeout=900)
    assert r.status_code == 200, r.text[:500]
    size = len(r.content)
    assert size > 80e6, size
    out = r.json()
    assert len(out["choices"]) == N
    for choice in out["choices"]:
        content = choice["logprobs"]["content"]
        assert len(content) == MAX_TOKENS
        assert all(len(entry["top_logprobs"]) == TOP for entry in content)
        assert "".join(entry["token"] for entry in content) == choice["message"]["content"]
    assert out["usage"]["completion_tokens"] == N * MAX_TOKENS
    assert probe.statuses == {200}
    slow = [(round(t - probe.times[0], 2), round(d * 1000)) for t, (d, _) in
            zip(probe.times, probe.samples, strict=True) if d > 0.03]
    assert probe.worst < 0.1, f"/health took {probe.worst * 1000:.0f} ms ({size / 1e6:.0f} MB " \
                              f"response): (s, ms) {slow}"
