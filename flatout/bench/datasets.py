"""Workloads: random prompts of exact token counts, a shared-prefix variant, ShareGPT files.

Exact counts need the server's tokenizer: a local checkpoint's (`--tokenizer`, or the folder the
server reports in /v1/models when it exists here), or the server's `/tokenize` and `/detokenize`.
Without either, the completions API gets prompts as token ids, which are exact by construction.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Protocol

import httpx

from flatout.bench.client import BenchRequest


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class LocalTokenizer:
    def __init__(self, path: str) -> None:
        from flatout.tokenizers.loader import load_tokenizer

        self.tok = load_tokenizer(path)

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        text = self.tok.decode(ids)
        assert isinstance(text, str)  # one sequence of ids decodes to one string
        return text


class RemoteTokenizer:
    """The server's /tokenize and /detokenize (vLLM's shapes)."""

    def __init__(self, base_url: str, model: str, headers: dict[str, str]) -> None:
        self.http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=60)
        self.model = model

    def encode(self, text: str) -> list[int]:
        r = self.http.post("/tokenize", json={"model": self.model, "prompt": text,
                                              "add_special_tokens": False})
        r.raise_for_status()
        return list(r.json()["tokens"])

    def decode(self, ids: list[int]) -> str:
        r = self.http.post("/detokenize", json={"model": self.model, "tokens": ids})
        r.raise_for_status()
        return str(r.json()["prompt"])

    @classmethod
    def probe(cls, base_url: str, model: str, headers: dict[str, str]) -> RemoteTokenizer | None:
        tok = cls(base_url, model, headers)
        try:
            tok.decode(tok.encode("hello world"))
        except (httpx.HTTPError, KeyError, ValueError):
            return None
        return tok


def _word(rng: random.Random) -> str:
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))


def token_pool(tok: Tokenizer, rng: random.Random) -> list[int]:
    """Ordinary token ids (no special tokens) from tokenizing random words."""
    ids: set[int] = set()
    for _ in range(15):  # pieces under any model_max_length, so no length warning
        ids.update(tok.encode(" ".join(_word(rng) for _ in range(200))))
    return sorted(ids)


def exact_text(tok: Tokenizer, pool: list[int], n: int, rng: random.Random) -> tuple[str, int]:
    """Text that the tokenizer encodes to `n` tokens (or the closest found), and its count."""
    ids = rng.choices(pool, k=n)
    best: tuple[str, int] = ("", 0)
    for _ in range(10):
        text = tok.decode(ids)
        got = tok.encode(text)
        if abs(len(got) - n) < abs(best[1] - n) or not best[0]:
            best = (text, len(got))
        if len(got) == n:
            break
        ids = got[:n] if len(got) > n else got + rng.choices(pool, k=n - len(got))
    return best


def _lengths(mean: int, ratio: float, count: int, rng: random.Random) -> list[int]:
    """Uniform in [mean * (1 - ratio), mean * (1 + ratio)], at least 1."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"--range-ratio must be in [0, 1) (got {ratio})")
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(count)]


def random_requests(num: int, input_len: int, output_len: int, ratio: float, seed: int,
                    tok: Tokenizer | None, vocab_size: int | None = None, prefix_len: int = 0,
                    num_prefixes: int = 1) -> list[BenchRequest]:
    """`num` prompts of `prefix_len` shared tokens (one of `num_prefixes` prefixes, round robin)
    plus a random part of about `input_len` tokens, each asking for about `output_len` tokens."""
    rng = random.Random(seed)
    ins = _lengths(input_len, ratio, num, rng)
    outs = _lengths(output_len, ratio, num, rng)
    reqs = []
    if tok is None:  # token ids: exact without a tokenizer (completions API)
        top = vocab_size or 1000
        pick = lambda k: [rng.randrange(min(100, top // 2), top) for _ in range(k)]  # noqa: E731
        id_prefixes = [pick(prefix_len) for _ in range(num_prefixes)]
        for i in range(num):
            ids = id_prefixes[i % num_prefixes] + pick(ins[i])
            reqs.append(BenchRequest(i, ids, len(ids), outs[i]))
        return reqs
    pool = token_pool(tok, rng)
    prefixes = [exact_text(tok, pool, prefix_len, rng) if prefix_len else ("", 0)
                for _ in range(num_prefixes)]
    for i in range(num):
        prefix, n_prefix = prefixes[i % num_prefixes]
        text, n = exact_text(tok, pool, ins[i], rng)
        if prefix:
            text = prefix + " " + text
            n = len(tok.encode(text))
        reqs.append(BenchRequest(i, text, n, outs[i]))
    return reqs


def sharegpt_requests(path: str, num: int, seed: int, tok: Tokenizer | None,
                      output_len: int | None = None, max_prompt_len: int = 1024,
                      max_total_len: int = 2048) -> list[BenchRequest]:
    """The first human turn of each ShareGPT conversation as the prompt; the reply's token count
    as the output length (unless `output_len`). With a tokenizer, as vLLM: drop prompts or replies
    under 4 tokens, prompts over `max_prompt_len` and pairs over `max_total_len`."""
    data: list[dict[str, Any]] = json.loads(Path(path).read_text())
    rng = random.Random(seed)
    rng.shuffle(data)
    reqs: list[BenchRequest] = []
    for conv in data:
        turns = conv.get("conversations") or conv.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt, reply = str(turns[0].get("value", "")), str(turns[1].get("value", ""))
        if not prompt:
            continue
        if tok is not None:
            n_in, n_out = len(tok.encode(prompt)), len(tok.encode(reply))
            if output_len is None and (n_in < 4 or n_out < 4 or n_in > max_prompt_len
                                       or n_in + n_out > max_total_len):
                continue
        else:
            n_in, n_out = 0, max(1, len(reply) // 4)  # the server's usage fills n_in in
        reqs.append(BenchRequest(len(reqs), prompt, n_in, output_len or n_out))
        if len(reqs) == num:
            break
    if not reqs:
        raise ValueError(f"{path}: no usable ShareGPT conversations")
    return reqs
