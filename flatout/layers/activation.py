"""Gated activations."""

from __future__ import annotations

import torch
from torch import nn

from flatout.kernels.ops import ops_for


class SiluAndMul(nn.Module):
    """SwiGLU: x = gate|up along the last dim -> silu(gate) * up, in fp32, rounded once."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = ops_for()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, 2I] -> [T, I]
        return self.ops.silu_and_mul(x)
