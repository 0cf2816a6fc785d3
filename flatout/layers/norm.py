"""RMSNorm, with an optional fused residual add (and all-reduce, for a pending reduce), and
LayerNorm with a bias (ChatGLM-6B v1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flatout.distributed import PendingReduce
from flatout.kernels.ops import ops_for
from flatout.layers.linear import default_weight_loader, set_weight_loader


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in float32.

    The product with `w` happens after casting back to the input dtype, as transformers does, so
    bf16 results match the reference bit for bit where the kernels agree. The implementation
    (flatout.kernels.ops) is chosen for the device the layer is built on."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        set_weight_loader(self.weight, default_weight_loader)
        self.ops = ops_for()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., hidden]
        return self.ops.rms_norm(x, self.weight, self.eps)

    def forward_with_residual(
        self, x: torch.Tensor | PendingReduce, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual): the sum is the next residual.

        A `PendingReduce` (a row-parallel linear's partial sum) is all-reduced first: in the same
        kernel as the add and the norm when it sits in a symmetric buffer, else over the group."""
        if isinstance(x, PendingReduce):
            if x.symmetric is not None:
                return x.symmetric.add_rms_norm(residual, self.weight, self.eps)
            x = x.finish()
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class LayerNorm(nn.Module):
    """y = w * (x - mean) / sqrt(var + eps) + b over the last dim (ChatGLM-6B v1), computed in
    float32 and rounded once to the input dtype."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)
        set_weight_loader(self.weight, default_weight_loader)
        set_weight_loader(self.bias, default_weight_loader)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., hidden]
        y = F.layer_norm(x.float(), self.weight.shape, self.weight.float(), self.bias.float(),
                         self.eps)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
