"""RMSNorm, with an optional fused residual add."""

from __future__ import annotations

import torch
from torch import nn

from flatout.layers.linear import default_weight_loader
from flatout.worker import distributed


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), normalised in float32.

    The product with `w` happens after casting back to the input dtype, as transformers does, so
    bf16 results match the reference bit for bit where the kernels agree."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., hidden]
        if x.is_cuda:
            from flatout.kernels import rms_norm

            return rms_norm(x, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward_with_residual(
        self, x: torch.Tensor, residual: torch.Tensor, partial: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual): the sum is the next residual.

        partial: `x` is this rank's partial sum from a row-parallel linear that left the
        all-reduce to this norm; one kernel reduces, adds and normalises where the group can."""
        if partial:
            fused = distributed.all_reduce_add_rms_norm(x, residual, self.weight, self.eps)
            if fused is not None:
                return fused
            x = distributed.all_reduce(x)
        if x.is_cuda:  # the add and the norm in one pass over the hidden states
            from flatout.kernels import fused_add_rms_norm

            return fused_add_rms_norm(x, residual, self.weight, self.eps)
        summed = x + residual
        return self.forward(summed), summed

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
