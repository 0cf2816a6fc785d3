"""/tokenize with the issue's 8 MB prompt and 2,048 messages (8 MB in all), and with the
longest prompt the size limit lets through: /health answers in < 100 ms meanwhile. The bodies
are parsed, rendered, refused or tokenized in the preparation thread (on the event loop, one
8 MB prompt stalled /health for 5-6 s)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from transformers import PreTrainedTokenizerFast

from flatout.demo import ASSETS
from flatout.server.limits import max_prompt_chars
from tests.reliability.attackers import HealthProbe
from tests.server.server_process import ServerProcess

MAX_MODEL_LEN = 1024
MESSAGES = 2048  # the most one request may carry
MB = 1000 * 1000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = ServerProcess(["--max-model-len", str(MAX_MODEL_LEN), "--num-kv-blocks", "256",
                       "--served-model-name", "demo"],  # the default body limit, 8 MiB
                      tmp_path_factory.mktemp("tokenize_large") / "serve.log")
    try:
        yield s
    finally:
        s.stop()


def _messages(total_bytes: int) -> list[dict[str, Any]]:
    """MESSAGES alternating user and assistant messages, `total_bytes` of text in all."""
    words = "the fox and the dog " * (total_bytes // MESSAGES // 20)
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} {words}"}
            for i in range(MESSAGES)]


def _post(h: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Response, int]:
    data = json.dumps(body).encode()
    r = h.post(path, content=data, headers={"Content-Type": "application/json"})
    return r, len(data)


def _check_fast(probe: HealthProbe, what: str) -> None:
    assert probe.statuses == {200}, probe.statuses
    assert len(probe.samples) >= 10, len(probe.samples)
    slow = [(round(t - probe.times[0], 2), round(d * 1000)) for t, (d, _) in
            zip(probe.times, probe.samples, strict=True) if d > 0.03]
    assert probe.worst < 0.1, f"/health took {probe.worst * 1000:.0f} ms ({what}): (s, ms) {slow}"


def _refused_as_too_long(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text[:300]
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == param, err


def test_8_mb_tokenize_requests_leave_health_fast(server: ServerProcess) -> None:
    u = urlsplit(server.url)
    assert u.hostname is not None and u.port is not None
    prompt = "the fox and the dog " * (8 * MB // 20)
    admitted = max_prompt_chars(PreTrainedTokenizerFast.from_pretrained(str(ASSETS)),
                                MAX_MODEL_LEN)
    assert admitted is not None and 64 * 1024 < admitted < len(prompt)
    with httpx.Client(base_url=server.url, timeout=120) as h, \
            HealthProbe(u.hostname, u.port, interval=0.02) as probe:
        r, size = _post(h, "/tokenize", {"prompt": prompt})
        assert size > 8e6, size
        _refused_as_too_long(r, "prompt")
        r, size = _post(h, "/tokenize", {"messages": _messages(8 * MB)})
        assert size > 8e6, size
        _refused_as_too_long(r, "messages")
        # the longest prompt the size limit lets through is tokenized (off the loop too)
        r, size = _post(h, "/tokenize", {"prompt": prompt[:admitted]})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["count"] > MAX_MODEL_LEN
    _check_fast(probe, "8 MB /tokenize requests")

