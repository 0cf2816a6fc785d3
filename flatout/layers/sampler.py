"""Batched token sampling with per-row parameters.

The model runner calls `Sampler` once per step on the logits rows of every sequence that produces a
token. All per-row settings travel as tensors in a `SamplingBatch`, so one call handles greedy,
sampled, seeded and penalised rows together without a Python loop over rows and without any
device-to-host copy (the runner copies the returned tensors afterwards). The only per-row loop is
over rows with their own seeded generator, which draw their noise from it.

Order of operations: logprobs of the raw logits (as vLLM reports them) -> logit bias (OpenAI's,
added to the logits) -> banned ids -> the grammar's bitmask (structured output) -> repetition,
frequency and presence penalties -> greedy rows take the argmax -> temperature -> top-k -> top-p
-> min-p -> sample with the exponential race: argmax(probs / E), E ~ Exp(1) i.i.d., which picks
index i with probability probs[i] / sum(probs).
Top-k keeps the logits at least a row's k-th largest (ties with it too); top-p then keeps the
survivors whose strictly more likely survivors hold less than top_p of their renormalised
probability, so tied tokens are kept or dropped together (flatout.kernels.reference.top_k_top_p
defines both; the CUDA kernel keeps the same set without sorting the vocabulary).
A seeded row's draw depends only on its generator, so it is reproducible whatever else shares the
batch and wherever the row sits.

Token ids >= V (the logits width) in prompts, outputs or banned lists are ignored: every padded id
tensor uses V as its pad value and is scattered into V + 1 columns whose last one is dropped.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from flatout.kernels.ops import ops_for
from flatout.sampling_params import SamplingParams

_FLOAT32_TINY = float(np.finfo(np.float32).tiny)
_MASK64 = 2**64 - 1


def generator_seed(seed: int) -> int:
    """The 64-bit value a request's `seed` (any int; taken modulo 2**64) seeds its generator
    with: splitmix64's finaliser, a bijection on 64 bits. CUDA's Philox generator uses all 64
    bits, but the CPU's Mersenne Twister keeps only the low 32, so seeds that differ only in
    their high bits (5 and 2**32 + 5) would share a stream without the mixing."""
    z = seed & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A request's own generator on `device`, seeded from its 64-bit `seed`."""
    return torch.Generator(device).manual_seed(generator_seed(seed))


@dataclass
class SamplingRow:
    """One sequence sampled this step, built by the model runner."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    # the request's own generator when params.seed is set, on the logits' device; owned (created
    # and kept across steps) by the runner
    generator: torch.Generator | None = None
    # ids masked out this step (EOS / stop ids while len(output) < min_tokens)
    banned_token_ids: list[int] = field(default_factory=list)


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors on the logits' device (B rows, vocab V).

    Optional tensors are None when no row needs them, so the sampler skips that work; greedy rows
    carry neutral values (temperature 1, no top-k/p, min-p 0) so they never trigger it."""

    vocab_size: int
    all_greedy: bool
    greedy: torch.Tensor | None  # [B] bool; None when no row is greedy
    temperature: torch.Tensor | None  # [B] float32 (1.0 on greedy rows); None when all greedy
    top_k: torch.Tensor | None  # [B] int64 in [1, V] (V = off, 1 on greedy rows); None: unused
    max_top_k: int  # largest active top-k (0 when top_k is None)
    top_k_every_row: bool  # no row has top-k off: truncation can work on max_top_k candidates
    top_p: torch.Tensor | None  # [B] float32 in (0, 1]
    min_p: torch.Tensor | None  # [B] float32 in [0, 1]
    generators: dict[int, torch.Generator]  # row index -> generator (sampled rows only)
    repetition_penalty: torch.Tensor | None  # [B] float32
    frequency_penalty: torch.Tensor | None  # [B] float32; None when all rows have 0
    presence_penalty: torch.Tensor | None  # [B] float32; None when all rows have 0
    prompt_ids: torch.Tensor | None  # [B, Lp] int64, padded with V; only with repetition_penalty
    output_ids: torch.Tensor | None  # [B, Lo] int64, padded with V; only with any penalty
    banned_ids: torch.Tensor | None  # [B, Lb] int64, padded with V
    bias_ids: torch.Tensor | None  # [B, Lk] int64, padded with V; None when no row has a bias
    bias_values: torch.Tensor | None  # [B, Lk] float32, 0 in the padding
    num_logprobs: int | None  # max top logprobs asked in the batch; None: no row asked
    # [B, ceil(V / 32)] int32, bit j of word w set: token 32 w + j allowed (structured output;
    # unconstrained rows have every bit set); None when no row follows a grammar. Set by the
    # runner from the engine's matchers, not by `build`.
    grammar_bitmask: torch.Tensor | None = None

    @classmethod
    def build(cls, rows: list[SamplingRow], vocab_size: int, device: torch.device) -> SamplingBatch:
        """Turn the runner's rows into batch tensors (host work plus host-to-device copies)."""
        if not rows:
            raise ValueError("SamplingBatch.build needs at least one row")
        V = vocab_size
        params = [r.params for r in rows]
        greedy = [p.is_greedy for p in params]

        def floats(values: list[float]) -> torch.Tensor:
            return _to_device(torch.tensor(values, dtype=torch.float32), device)

        def per_row(name: str, neutral: float) -> list[float]:
            # greedy rows get the neutral value so they never switch the step on
            return [neutral if p.is_greedy else float(getattr(p, name)) for p in params]

        temperature = per_row("temperature", 1.0)
        # a top_p below float32's smallest normal number would round to 0 (dropping every token);
        # any top_p below the largest probability keeps only the most likely token, as this does
        top_p = [max(v, _FLOAT32_TINY) for v in per_row("top_p", 1.0)]
        min_p = per_row("min_p", 0.0)
        # greedy rows keep 1 (their token is taken before truncation), so they never force the
        # full-vocabulary path
        top_k = [1 if p.is_greedy else min(p.top_k, V) if p.top_k > 0 else V for p in params]
        active_k = [k for k, g in zip(top_k, greedy, strict=True) if k < V and not g]
        rep = [p.repetition_penalty for p in params]
        freq = [p.frequency_penalty for p in params]
        pres = [p.presence_penalty for p in params]
        use_rep = any(v != 1.0 for v in rep)
        use_freq = any(v != 0.0 for v in freq)
        use_pres = any(v != 0.0 for v in pres)
        use_out = use_rep or use_freq or use_pres
        # rows with neutral penalties need no tokens: their counts would change nothing
        prompts = [r.prompt_token_ids if rp != 1.0 else [] for r, rp in zip(rows, rep, strict=True)]
        outputs = [
            r.output_token_ids if (rp, f, pr) != (1.0, 0.0, 0.0) else []
            for r, rp, f, pr in zip(rows, rep, freq, pres, strict=True)
        ]
        banned = [r.banned_token_ids for r in rows]
        biases = [p.logit_bias or {} for p in params]
        use_bias = any(biases)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        all_greedy = all(greedy)
        generators = {  # only sampled rows draw noise
            i: r.generator for i, r in enumerate(rows) if r.generator is not None and not greedy[i]
        }

        return cls(
            vocab_size=V,
            all_greedy=all_greedy,
            greedy=_to_device(torch.tensor(greedy), device) if any(greedy) else None,
            temperature=None if all_greedy else floats(temperature),
            top_k=_to_device(torch.tensor(top_k), device) if active_k else None,
            max_top_k=max(active_k, default=0),
            top_k_every_row=bool(active_k) and max(top_k) < V,
            top_p=floats(top_p) if any(v < 1.0 for v in top_p) else None,
            min_p=floats(min_p) if any(v > 0.0 for v in min_p) else None,
            generators=generators,
            repetition_penalty=floats(rep) if use_rep else None,
            frequency_penalty=floats(freq) if use_freq else None,
            presence_penalty=floats(pres) if use_pres else None,
            prompt_ids=_padded(prompts, V, device) if use_rep else None,
            output_ids=_padded(outputs, V, device) if use_out else None,
            banned_ids=_padded(banned, V, device) if any(banned) else None,
            bias_ids=_padded([list(b) for b in biases], V, device) if use_bias else None,
            bias_values=(_padded_floats([list(b.values()) for b in biases], device)
                         if use_bias else None),
            num_logprobs=min(max(asked), V) if asked else None,
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] float32: logprob of the sampled token (None: no row asked)
    top_ids: torch.Tensor | None  # [B, K] int64, K = max logprobs asked (None when K == 0)
    top_logprobs: torch.Tensor | None  # [B, K] float32


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _padded(lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[B, max(len)] int64, right-padded with `pad` (at least one column)."""
    # numpy's fromiter is several times faster than torch.tensor on nested lists
    lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))  # [B]
    flat = np.fromiter(itertools.chain.from_iterable(lists), np.int64, int(lengths.sum()))
    out = np.full((len(lists), max(1, int(lengths.max()))), pad, dtype=np.int64)  # [B, L]
    out[np.arange(out.shape[1]) < lengths[:, None]] = flat
    return _to_device(torch.from_numpy(out), device)


def _padded_floats(lists: list[list[float]], device: torch.device) -> torch.Tensor:
    """[B, max(len)] float32, right-padded with 0 (at least one column)."""
    out = np.zeros((len(lists), max(1, max(map(len, lists)))), dtype=np.float32)
    for i, values in enumerate(lists):
        out[i, :len(values)] = values
    return _to_device(torch.from_numpy(out), device)


def _seen_mask(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """ids: [B, L] padded with V (ids > V also land in the pad column) -> [B, V] bool."""
    ids = ids.clamp(max=vocab_size)
    mask = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, ids, True)
    return mask[:, :vocab_size]


def apply_logit_bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Add each row's logit_bias to its logits in place. logits: [B, V] float32."""
    if batch.bias_ids is None:
        return logits
    assert batch.bias_values is not None
    B, V = logits.shape
    bias = torch.zeros(B, V + 1, dtype=logits.dtype, device=logits.device)
    bias.scatter_add_(1, batch.bias_ids.clamp(max=V), batch.bias_values)  # pads land in column V
    logits += bias[:, :V]
    return logits


def apply_banned(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Set banned ids to -inf in place. logits: [B, V]."""
    if batch.banned_ids is not None:
        logits.masked_fill_(_seen_mask(batch.banned_ids, logits.shape[1]), float("-inf"))
    return logits


def apply_grammar_bitmask(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Set the ids a row's grammar does not allow to -inf, in place. logits: [B, V]."""
    if batch.grammar_bitmask is None:
        return logits
    B, V = logits.shape
    words = batch.grammar_bitmask  # [B, W], W >= ceil(V / 32)
    shifts = torch.arange(32, dtype=torch.int32, device=words.device)  # [32]
    allowed = ((words.unsqueeze(2) >> shifts) & 1).view(B, -1)[:, :V]  # [B, V]
    logits.masked_fill_(allowed == 0, float("-inf"))
    return logits


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens (positive logits divided, negative ones
    multiplied), then OpenAI's frequency / presence penalties over output tokens:
    logit -= frequency * count + presence * (count > 0). In place. logits: [B, V] float32."""
    if batch.output_ids is None:
        return logits
    B, V = logits.shape
    out_ids = batch.output_ids.clamp(max=V)  # [B, Lo]
    counts = torch.zeros(B, V + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, out_ids, torch.ones_like(out_ids, dtype=logits.dtype))
    counts = counts[:, :V]  # [B, V] occurrences in the output
    in_output = counts > 0
    if batch.repetition_penalty is not None:
        assert batch.prompt_ids is not None
        seen = _seen_mask(batch.prompt_ids, V) | in_output  # [B, V]
        rp = batch.repetition_penalty.unsqueeze(1)  # [B, 1]
        penalised = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalised, logits)
    if batch.frequency_penalty is not None:
        logits -= batch.frequency_penalty.unsqueeze(1) * counts
    if batch.presence_penalty is not None:
        logits -= batch.presence_penalty.unsqueeze(1) * in_output
    return logits


def _exponential_race(probs: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """probs: [B, V], unnormalised weights allowed -> [B] int64 index drawn from each row."""
    # [B, V] ~ Exp(1). CUDA's generator never returns 0; CPU's does with odds 2**-53, negligible.
    noise = torch.empty_like(probs)
    if len(batch.generators) < probs.shape[0]:
        noise.exponential_()  # one call for every row on the default generator
    for row, generator in batch.generators.items():
        noise[row].exponential_(generator=generator)  # seeded rows: their own stream
    return probs.div_(noise).argmax(dim=1)


class Sampler(nn.Module):
    """Picks one token per row; see the module docstring for the order of operations.

    Top-k / top-p run flatout.kernels.ops' `top_k_top_p` for `device` (default: torch's default
    device): on CUDA without sorting the vocabulary, elsewhere the sort-based reference; both
    keep the same tokens."""

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.ops = ops_for(device)

    def warm_up(self, device: torch.device) -> None:
        """Run top-p once on a row of many chunks and on many short rows, the two ways its CUDA
        kernel launches, so that it compiles now rather than on the first request using it."""
        for rows, vocab in ((1, 4096), (1024, 64)):
            logits = torch.zeros(rows, vocab, device=device)
            top_p = torch.full((rows,), 0.5, device=device)
            self.ops.top_k_top_p(logits, None, top_p, 0, False)

    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [B, V] (float32; other dtypes are upcast). May be modified in place."""
        logits = logits.float()
        raw_logprobs = None
        if batch.num_logprobs is not None:
            raw_logprobs = logits.log_softmax(dim=1)  # [B, V], before any processing

        logits = apply_logit_bias(logits, batch)
        logits = apply_banned(logits, batch)
        logits = apply_grammar_bitmask(logits, batch)
        logits = apply_penalties(logits, batch)

        if batch.all_greedy:
            token_ids = logits.argmax(dim=1)
        else:
            greedy_ids = logits.argmax(dim=1) if batch.greedy is not None else None
            assert batch.temperature is not None
            logits.div_(batch.temperature.unsqueeze(1))
            if batch.top_k is not None or batch.top_p is not None:
                logits = self.ops.top_k_top_p(logits, batch.top_k, batch.top_p,
                                              batch.max_top_k, batch.top_k_every_row)
            probs = logits.softmax(dim=1)  # [B, V]
            if batch.min_p is not None:
                floor = probs.amax(dim=1, keepdim=True) * batch.min_p.unsqueeze(1)  # [B, 1]
                probs.masked_fill_(probs < floor, 0.0)
            token_ids = _exponential_race(probs, batch)
            if greedy_ids is not None:
                assert batch.greedy is not None
                token_ids = torch.where(batch.greedy, greedy_ids, token_ids)

        if raw_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        sampled_logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)  # [B]
        top_ids = top_logprobs = None
        if batch.num_logprobs:
            top_logprobs, top_ids = raw_logprobs.topk(batch.num_logprobs, dim=1)  # [B, K]
        return SamplerOutput(token_ids, sampled_logprobs, top_ids, top_logprobs)
