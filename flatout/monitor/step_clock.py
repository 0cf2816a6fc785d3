"""The GPU time and the work of every engine step, for the busy fraction and MBU/MFU.

Each step is timed from its start to its end on the device (CUDA events on the GPU, so the engine
loop never waits for them; the wall clock on the CPU), and classified by what it computed:
`prefill` (no sequence decoding), `decode` (every sequence advancing by one token) or `mixed`.
Its work is the least the step must do, from the model's shapes:

- bytes: the weights read once (the LM head included, the input embedding table not: a lookup
  reads only its rows) plus the KV entries attention reads and writes;
- FLOPs: 2 x linear parameters per computed token, the LM head per sampled row, and attention's
  QK^T and PV: 4 x layers x heads x head_dim per (query token, key) pair.

MBU = bytes / time / peak bandwidth, MFU = FLOPs / time / peak FLOP/s, with the peaks measured on
the device at startup (a copy and a matmul, as `benchmarks/bench_gpu.py` does) unless given.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from flatout.config import ModelConfig

if TYPE_CHECKING:  # torch is imported where it is used: the monitoring side never needs it
    import torch

STEP_TYPES = ("prefill", "decode", "mixed")


@dataclass
class StepTotals:
    """Cumulative time and work of the finished steps of one type."""

    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0  # tokens computed (query tokens)
    bytes: float = 0.0
    flops: float = 0.0


@dataclass(frozen=True)
class DevicePeak:
    bandwidth: float  # bytes/s (read + written) of a device-to-device copy
    flops: float  # FLOP/s of a large matmul in the model's dtype
    source: str  # "measured" | "given"


@dataclass(frozen=True)
class StepCost:
    """Per-step constants of one model, from its config."""

    weight_bytes: int  # read once per forward
    kv_bytes_per_token: int
    linear_flops_per_token: int
    lm_head_flops_per_row: int
    attn_flops_per_pair: int

    @classmethod
    def of(cls, cfg: ModelConfig, kv_cache_dtype: str = "auto") -> StepCost:
        embed = cfg.vocab_size * cfg.hidden_size
        # tied: one table serves as LM head (read every step); untied: the input table is only
        # looked up, and the layers' parameters are the rest less the LM head
        input_table = 0 if cfg.tie_word_embeddings else embed
        linear = cfg.num_params - embed * (1 if cfg.tie_word_embeddings else 2)
        return cls(
            # quantized linears at their real size (cfg.weight_bytes); the table stays 16-bit
            weight_bytes=cfg.weight_bytes - input_table * cfg.dtype_bytes,
            kv_bytes_per_token=cfg.kv_cache_bytes_per_token(kv_cache_dtype),
            linear_flops_per_token=2 * linear,
            lm_head_flops_per_row=2 * embed,
            attn_flops_per_pair=4 * cfg.num_hidden_layers * cfg.num_attention_heads
            * cfg.head_dim,
        )

    def work(self, num_new_tokens: list[int], seq_lens: list[int], num_sampled: int
             ) -> tuple[float, float]:
        """(bytes, FLOPs) of a step computing `num_new_tokens[i]` tokens ending at `seq_lens[i]`."""
        tokens = sum(num_new_tokens)
        # each new token at position p attends to p + 1 keys
        pairs = sum(n * (end - n) + n * (n + 1) // 2
                    for n, end in zip(num_new_tokens, seq_lens, strict=True))
        kv_tokens = sum(seq_lens)  # read (and the new ones written)
        nbytes = self.weight_bytes + self.kv_bytes_per_token * kv_tokens
        flops = (self.linear_flops_per_token * tokens + self.lm_head_flops_per_row * num_sampled
                 + self.attn_flops_per_pair * pairs)
        return float(nbytes), float(flops)


def step_type(num_new_tokens: list[int]) -> str:
    decodes = sum(1 for n in num_new_tokens if n == 1)
    if decodes == len(num_new_tokens):
        return "decode"
    return "prefill" if decodes == 0 else "mixed"


class StepClock:
    """Times steps on the device; `totals()` folds in those that finished, without waiting."""

    def __init__(self, cost: StepCost, device: torch.device, peak: DevicePeak) -> None:
        self.cost = cost
        self.device = device
        self.peak = peak
        self._totals = {t: StepTotals() for t in STEP_TYPES}
        self._open: tuple[str, int, float, float, Any] | None = None
        self._pending: deque[tuple[str, int, float, float, Any, Any]] = deque()

    def begin(self, num_new_tokens: list[int], seq_lens: list[int], num_sampled: int) -> None:
        nbytes, flops = self.cost.work(num_new_tokens, seq_lens, num_sampled)
        if self.device.type == "cuda":
            import torch

            start: Any = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        self._open = (step_type(num_new_tokens), sum(num_new_tokens), nbytes, flops, start)

    def end(self) -> None:
        if self._open is None:
            return
        kind, tokens, nbytes, flops, start = self._open
        self._open = None
        if self.device.type == "cuda":
            import torch

            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            self._pending.append((kind, tokens, nbytes, flops, start, stop))
            self._fold_finished()  # keeps the pending queue short when nobody reads totals
        else:
            self._add(kind, tokens, nbytes, flops, time.perf_counter() - start)

    def _add(self, kind: str, tokens: int, nbytes: float, flops: float, seconds: float) -> None:
        t = self._totals[kind]
        t.steps += 1
        t.seconds += seconds
        t.tokens += tokens
        t.bytes += nbytes
        t.flops += flops

    def _fold_finished(self) -> None:
        while self._pending and self._pending[0][5].query():
            kind, tokens, nbytes, flops, start, stop = self._pending.popleft()
            self._add(kind, tokens, nbytes, flops, start.elapsed_time(stop) / 1e3)

    def totals(self) -> dict[str, StepTotals]:
        """Copies of the per-type totals over every step whose device work has finished."""
        self._fold_finished()
        return {k: replace(v) for k, v in self._totals.items()}


def measure_peak(device: torch.device, dtype: torch.dtype, bandwidth: float | None = None,
                 flops: float | None = None, num_devices: int = 1) -> DevicePeak:
    """One device's copy bandwidth and matmul rate, each measured unless given (bytes/s, FLOP/s),
    times `num_devices` (tensor-parallel ranks share every step's work). Quick: a few 256 MiB
    copies and 8192^3 matmuls on the GPU (~0.1 s), 1024^3 on the CPU."""
    if bandwidth is not None and flops is not None:
        return DevicePeak(bandwidth * num_devices, flops * num_devices, "given")
    import torch

    cuda = device.type == "cuda"
    nbytes, m, reps = (256 << 20, 8192, 10) if cuda else (16 << 20, 1024, 2)

    def timed(fn: Any) -> float:
        fn()  # warm up
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
        return (time.perf_counter() - t) / reps

    with torch.inference_mode():
        if bandwidth is None:
            a = torch.empty(nbytes, dtype=torch.uint8, device=device)
            b = torch.empty_like(a)
            bandwidth = 2 * nbytes / timed(lambda: b.copy_(a))
            del a, b
        if flops is None:
            x = torch.randn(m, m, dtype=dtype, device=device)
            y = torch.randn(m, m, dtype=dtype, device=device)
            flops = 2 * m**3 / timed(lambda: x @ y)
            del x, y
    if cuda:
        torch.cuda.empty_cache()
    return DevicePeak(bandwidth * num_devices, flops * num_devices, "measured")
