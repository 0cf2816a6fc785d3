"""Rotary position embedding over the first `rotary_dim` dims of each head.

Two pairings of the rotated dims exist in the checkpoints we serve:
- interleaved (GPT-J; GLM, ChatGLM): pairs (x0, x1), (x2, x3), ...; pair i turns by pos * f_i
- half-split (NeoX; Llama, Qwen): pairs (x_i, x_{i + R/2})
Dims past `rotary_dim` pass through unchanged (GLM rotates half of each head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flatout.kernels.ops import ops_for

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def check_rope_scaling(rope_scaling: dict[str, Any] | None) -> None:
    """Raise ValueError for a rope_scaling this module cannot reproduce."""
    if rope_scaling is None:
        return
    rope_type = rope_scaling.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope scaling type {rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    need = {"linear": ["factor"], "llama3": ["factor", "low_freq_factor", "high_freq_factor",
                                             "original_max_position_embeddings"]}
    missing = [k for k in need.get(rope_type, []) if k not in rope_scaling]
    if missing:
        raise ValueError(f"rope scaling {rope_type!r} lacks {missing}")


def rope_inv_freq(
    rotary_dim: int, base: float, rope_scaling: dict[str, Any] | None = None
) -> torch.Tensor:  # [rotary_dim // 2] float32
    """Angular frequency of each rotated pair, after any context-extension scaling."""
    check_rope_scaling(rope_scaling)
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    scaling = rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":  # positions divided by factor == frequencies divided by it
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3_scaling(inv_freq, scaling)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1: long wavelengths slowed by `factor`, short ones kept, a smooth blend between."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    between = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(between, blended, out)


@dataclass
class PerTokenRope:
    """The cos|sin of every token of one forward, gathered once (M-RoPE) and read by every
    layer: the rotation indexes `cos_sin` by `token`."""

    token: torch.Tensor  # [T]: 0 .. T-1
    cos_sin: torch.Tensor  # [T, R] float32


class RotaryEmbedding(nn.Module):
    """Applies rotary embedding to q and k of a flattened batch, given each token's position.

    cos/sin are precomputed in float32 for positions [0, max_position); the rotation is done in
    float32 and cast back to the input dtype, in place in q and k (flatout.kernels.ops)."""

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        interleaved: bool,
        rope_scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
            raise ValueError(f"rotary_dim {rotary_dim} must be even and in (0, {head_dim}]")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        inv_freq = rope_inv_freq(rotary_dim, base, rope_scaling)
        pos = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq.to(pos.device))  # [P, R/2]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1)  # [P, R]: cos | sin
        self.cos_sin_cache: torch.Tensor
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.ops = ops_for()

    def prepare(self, positions: torch.Tensor) -> torch.Tensor | PerTokenRope:
        """What the layers of one forward pass to `forward` (computed once per forward)."""
        return positions

    def forward(
        self,
        positions: torch.Tensor | PerTokenRope,  # [T] or `prepare`'s
        q: torch.Tensor,  # [T, H*D]
        k: torch.Tensor,  # [T, KVH*D]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q and k in place and returns them."""
        if isinstance(positions, PerTokenRope):
            return self.ops.rotary_embedding(positions.token, q, k, positions.cos_sin,
                                             self.head_dim, self.interleaved)
        return self.ops.rotary_embedding(
            positions, q, k, self.cos_sin_cache, self.head_dim, self.interleaved
        )

    def extra_repr(self) -> str:
        style = "interleaved" if self.interleaved else "half-split"
        return f"rotary_dim={self.rotary_dim}/{self.head_dim}, {style}"


class MRotaryEmbedding(RotaryEmbedding):
    """M-RoPE (GLM-4.1V): interleaved partial rotary whose pairs are split into sections turned
    by the temporal, height and width positions (`mrope_section` [8, 12, 12]: pairs 0-7 by t,
    8-19 by h, 20-31 by w). positions: [3, T]; [T] (text only: t = h = w) is accepted too.

    `prepare` gathers a per-token cos|sin table [T, R] from the position cache once per
    forward; every layer rotates with the same op as 1-D rotary, indexing that table by token."""

    def __init__(
        self, head_dim: int, rotary_dim: int, max_position: int, base: float,
        mrope_section: tuple[int, ...],
    ) -> None:  # fmt: skip
        super().__init__(head_dim, rotary_dim, max_position, base, interleaved=True)
        if 2 * sum(mrope_section) != rotary_dim or len(mrope_section) != 3:
            raise ValueError(f"mrope_section {mrope_section} must be 3 parts summing to "
                             f"rotary_dim / 2 = {rotary_dim // 2}")
        axis = torch.cat([torch.full((n,), i) for i, n in enumerate(mrope_section)])
        self.axis: torch.Tensor  # [R]: which position row turns each column (cos | sin)
        self.register_buffer("axis", torch.cat([axis, axis]).long(), persistent=False)

    def prepare(self, positions: torch.Tensor) -> torch.Tensor | PerTokenRope:
        if positions.dim() == 1:
            return positions
        t = positions.shape[1]
        per_axis = self.cos_sin_cache[positions.long()]  # [3, T, R]
        table = per_axis.gather(0, self.axis.view(1, 1, -1).expand(1, t, -1))[0]  # [T, R]
        return PerTokenRope(torch.arange(t, device=positions.device), table)

    def forward(
        self,
        positions: torch.Tensor | PerTokenRope,  # [3, T], [T] or `prepare`'s
        q: torch.Tensor,
        k: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(positions, torch.Tensor) and positions.dim() == 2:
            positions = self.prepare(positions)
        return super().forward(positions, q, k)
