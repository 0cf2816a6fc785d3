"""One streaming request to an OpenAI-compatible server, timed chunk by chunk."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from flatout.bench.metrics import RequestRecord


@dataclass
class BenchRequest:
    index: int
    prompt: str | list[int]  # text, or token ids (completions API only)
    prompt_len: int
    output_len: int | None  # None: let the model stop by itself
    image_urls: list[str] = field(default_factory=list)  # chat API: sent before the text


@dataclass
class Endpoint:
    base_url: str
    model: str
    api: str = "completions"  # "completions" | "chat"
    api_key: str | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        path = "/v1/chat/completions" if self.api == "chat" else "/v1/completions"
        return self.base_url.rstrip("/") + path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def body(self, req: BenchRequest) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "stream": True,
                                "stream_options": {"include_usage": True},
                                "temperature": self.temperature}
        if self.api == "chat":
            if not isinstance(req.prompt, str):
                raise ValueError("the chat API needs text prompts: give --tokenizer, or use "
                                 "a server with /tokenize")
            content: str | list[dict[str, Any]] = req.prompt
            if req.image_urls:
                content = [*({"type": "image_url", "image_url": {"url": u}}
                             for u in req.image_urls), {"type": "text", "text": req.prompt}]
            body["messages"] = [{"role": "user", "content": content}]
        else:
            body["prompt"] = req.prompt
        if req.output_len is not None:
            body["max_tokens"] = req.output_len
            if self.ignore_eos:  # force the output length (vLLM's and SGLang's extensions)
                body["ignore_eos"] = True
                body["min_tokens"] = req.output_len
        body.update(self.extra_body)
        return body


def _carries_output(data: dict[str, Any]) -> bool:
    """Whether a streamed chunk carries generated tokens: any completions choice (its text may
    be empty for a model served without a tokenizer, or while a character is incomplete), or
    chat content/reasoning (the first chat chunk, which only names the role, does not count)."""
    for choice in data.get("choices") or []:
        if "text" in choice:
            return True
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
            return True
    return False


async def send_request(client: httpx.AsyncClient, ep: Endpoint, req: BenchRequest,
                       t0: float) -> RequestRecord:
    """Send `req`, stream the answer; `t0` is the run's start on time.perf_counter's clock."""
    rec = RequestRecord(req.index, req.prompt_len, req.output_len)
    chunks = 0
    usage: dict[str, Any] | None = None
    last = 0.0
    start = time.perf_counter()
    rec.start = start - t0
    try:
        async with client.stream("POST", ep.url, json=ep.body(req), headers=ep.headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                rec.error = f"HTTP {resp.status_code}: {body[:300]}"
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                data = json.loads(payload)
                if "error" in data:
                    rec.error = str(data["error"])[:300]
                    return rec
                if data.get("usage"):
                    usage = data["usage"]
                if not _carries_output(data):
                    continue
                if chunks == 0:
                    rec.ttft = now - start
                else:
                    rec.itl.append(now - last)
                last = now
                chunks += 1
        rec.e2el = time.perf_counter() - start
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as e:
        rec.error = f"{type(e).__name__}: {e}"[:300]
        return rec
    if chunks == 0:
        rec.error = "no generated tokens in the stream"
        return rec
    rec.output_tokens = int(usage["completion_tokens"]) if usage else chunks
    if usage and usage.get("prompt_tokens"):
        rec.prompt_len = int(usage["prompt_tokens"])
    rec.success = True
    return rec


def make_client(max_connections: int, timeout: float) -> httpx.AsyncClient:
    """A pooled client with room for every concurrent request (no queueing in the pool)."""
    limits = httpx.Limits(max_connections=max_connections,
                          max_keepalive_connections=max_connections)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=30.0))
