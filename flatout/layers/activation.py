"""Activations of the MLPs: SwiGLU (gated) and GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flatout.kernels.ops import ops_for


class SiluAndMul(nn.Module):
    """SwiGLU: x = gate|up along the last dim -> silu(gate) * up, in fp32, rounded once."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = ops_for()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, 2I] -> [T, I]
        return self.ops.silu_and_mul(x)


class GeluTanh(nn.Module):
    """GELU with the tanh approximation (ChatGLM-6B v1's MLP), in fp32, rounded once."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x.float(), approximate="tanh").to(x.dtype)
