"""A stream that takes several steps' deltas joined as one (its consumer resumed late) sends the
same text and logprobs as one that takes them step by step: one chunk carrying every token's
logprobs in order, offsets running on (completions, checked on the SSE events; no engine)."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from flatout.engine.messages import CoreStats, TokenLogprobs
from flatout.engine.outputs import CompletionOutput, RequestOutput, join_deltas
from flatout.sampling_params import SamplingParams
from flatout.server.metrics import ServerMetrics
from flatout.server.protocol import CompletionRequest
from flatout.server.serving_completion import _CompletionChoices, prepare_completion
from flatout.server.stream import stream_events


class _Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(chr(i) for i in ids)


def _state() -> Any:
    tok = _Tokenizer()
    client = SimpleNamespace(default_sampling_params=lambda **kw: SamplingParams(**kw),
                             inputs=SimpleNamespace(validate=lambda ids, params: None))
    return SimpleNamespace(check_model=lambda name: name, client=client, tokenizer=tok,
                           max_prompt_chars=10_000, token_text=lambda t: tok.decode([t]),
                           metrics=ServerMetrics(lambda: CoreStats(), "m", nvml=None))


def _steps(n: int, steps: int) -> list[RequestOutput]:
    out = []
    for step in range(steps):
        outs = []
        for i in range(n):
            t = 97 + (step + i) % 26
            last = step == steps - 1
            outs.append(CompletionOutput(
                i, chr(t) * (1 + step % 2), [t], "length" if last else None,
                logprobs=[TokenLogprobs(t, -0.1 * step, {t: -0.1 * step, 65 + i: -3.0},
                                        text=chr(t) * (1 + step % 2))]))
        out.append(RequestOutput("r", None, [1, 2], outs, step == steps - 1))
    return out


def _events(deltas: list[RequestOutput], n: int) -> list[dict[str, Any]]:
    state = _state()
    req = CompletionRequest(model="m", prompt="hi", n=n, max_tokens=8, logprobs=1, stream=True)
    p = prepare_completion(state, req)

    async def gen() -> AsyncIterator[RequestOutput]:
        for d in deltas:
            yield d

    async def run() -> list[str]:
        ticket = SimpleNamespace(end=lambda outcome: None)
        return [e async for e in stream_events(
            state, lambda: [gen()], n, _CompletionChoices(state, req, p), base={"id": "x"},
            include_usage=False, ticket=ticket, arrival=0.0)]  # type: ignore[arg-type]

    text = "".join(asyncio.run(run()))
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(e[len("data: "):]) for e in text.split("\n\n")[:-2]]


def _per_choice(events: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = [{"text": "", "tokens": [], "token_logprobs": [],
                                  "top_logprobs": [], "text_offset": [], "finish": None}
                                 for _ in range(n)]
    for e in events:
        for c in e["choices"]:
            g = got[c["index"]]
            g["text"] += c["text"]
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                g[key] += c["logprobs"][key]
            g["finish"] = c["finish_reason"] or g["finish"]
    return got


def test_joined_deltas_stream_the_same_text_and_logprobs() -> None:
    n, steps = 2, 6
    one_by_one = _events(_steps(n, steps), n)
    deltas = _steps(n, steps)
    joined = [join_deltas(join_deltas(copy.deepcopy(deltas[0]), deltas[1]), deltas[2]),
              deltas[3], join_deltas(deltas[4], deltas[5])]
    together = _events(joined, n)
    assert len(together) < len(one_by_one)
    a, b = _per_choice(one_by_one, n), _per_choice(together, n)
    assert a == b
    for c in b:  # every token's logprobs in order, offsets running on
        assert c["text"] and c["finish"] == "length"
        assert "".join(c["tokens"]) == c["text"] and len(c["tokens"]) == steps
        assert c["text_offset"][0] == 0
        assert all(o2 - o1 == len(t) for o1, o2, t in
                   zip(c["text_offset"], c["text_offset"][1:], c["tokens"], strict=False))
