"""Load-test an OpenAI-compatible server (flatout, vLLM, SGLang, ...) with locust.

    locust -f examples/locustfile.py --host http://127.0.0.1:8000 \
           --headless --users 32 --spawn-rate 32 --run-time 2m

Each user streams completions one after another (a closed loop, as `flatout bench
--concurrency N`). Besides locust's own request rows (the whole streamed response), it reports
time to first token as "TTFT" and time per output token as "TPOT" rows, in milliseconds.

Settings (environment variables): LLM_MODEL (default: the server's first model), LLM_API
(completions | chat), LLM_PROMPT_WORDS (default 200), LLM_MAX_TOKENS (default 128),
LLM_IGNORE_EOS (1: generate exactly LLM_MAX_TOKENS tokens; default 1), OPENAI_API_KEY.
`flatout bench` gives exact token counts, percentiles as vLLM defines them and GPU utilization;
this file is for teams whose load tests already live in locust.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

API = os.environ.get("LLM_API", "completions")
PROMPT_WORDS = int(os.environ.get("LLM_PROMPT_WORDS", "200"))
MAX_TOKENS = int(os.environ.get("LLM_MAX_TOKENS", "128"))
IGNORE_EOS = os.environ.get("LLM_IGNORE_EOS", "1") == "1"
# prompts are drawn from a seeded generator: the same run sends the same prompts
_RNG = random.Random(int(os.environ.get("LLM_SEED", "0")))
WORDS = ("the model serves tokens quickly when the batch is large and the cache is warm so "
         "every request shares the device with many others").split()


def _report(name: str, ms: float, length: int = 0) -> None:
    events.request.fire(request_type="LLM", name=name, response_time=ms,
                        response_length=length, exception=None, context={})


class LLMUser(HttpUser):
    wait_time = between(0, 0)  # closed loop: the next request as soon as one finishes

    def on_start(self) -> None:
        key = os.environ.get("OPENAI_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.model = os.environ.get("LLM_MODEL")
        if not self.model:
            with self.client.get("/v1/models", headers=self.headers, name="/v1/models",
                                 catch_response=True) as r:
                self.model = r.json()["data"][0]["id"]

    def body(self) -> dict:
        prompt = " ".join(_RNG.choices(WORDS, k=PROMPT_WORDS))
        body: dict = {"model": self.model, "max_tokens": MAX_TOKENS, "stream": True,
                      "stream_options": {"include_usage": True}, "temperature": 0.0}
        if IGNORE_EOS:
            body.update(ignore_eos=True, min_tokens=MAX_TOKENS)
        if API == "chat":
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        return body

    @task
    def generate(self) -> None:
        path = "/v1/chat/completions" if API == "chat" else "/v1/completions"
        start = time.perf_counter()
        first = None
        tokens = 0
        with self.client.post(path, json=self.body(), headers=self.headers, stream=True,
                              name=path, catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            for line in r.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:") or line.endswith("[DONE]"):
                    continue
                data = json.loads(line[5:])
                if data.get("usage"):
                    tokens = data["usage"].get("completion_tokens", tokens)
                choices = data.get("choices") or []
                text = "".join((c.get("text") or "") + ((c.get("delta") or {}).get("content")
                                                         or "") for c in choices)
                if text and first is None:
                    first = time.perf_counter()
            end = time.perf_counter()
            if first is None:
                r.failure("no generated text in the stream")
                return
            r.success()
        _report("TTFT", (first - start) * 1e3)
        if tokens > 1:
            _report("TPOT", (end - first) * 1e3 / (tokens - 1), tokens)
