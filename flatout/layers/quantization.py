"""Quantized weight formats of the parallel linears and the LM head.

A quantized layer is the same layer holding another weight format: `weight` in the format's
storage dtype (int8 or float8_e4m3fn) [out, in] plus `weight_scale` (fp32, one per output
channel), with weight ~= q * scale[:, None]. The layer's weight loader quantizes each
full-precision checkpoint row as it arrives (`WeightFormat.quantize`), so the tensor-parallel
sharding code is the dense one: rows are quantized independently, and a row-parallel layer
quantizes the whole row before keeping its columns, so every rank holds the scales of the
unsplit checkpoint. The format also names the op that multiplies with it (flatout.kernels.ops).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flatout.kernels import reference
from flatout.kernels.ops import Ops

Tensor = torch.Tensor
QuantLinear = Callable[[Tensor, Tensor, Tensor, Tensor | None], Tensor]


@dataclass(frozen=True)
class WeightFormat:
    method: str  # "int8" | "fp8"
    dtype: torch.dtype  # of the stored weight
    quantize: Callable[[Tensor], tuple[Tensor, Tensor]]  # rows [N, K] -> (q [N, K], scale [N])

    def kernel(self, ops: Ops) -> QuantLinear:
        """(x, q, scale, bias) -> x @ (q * scale).T + bias, on the ops' device."""
        return ops.linear_w8a16 if self.method == "int8" else ops.linear_w8a8_fp8

    def new_parameters(self, rows: int, cols: int) -> tuple[nn.Parameter, nn.Parameter]:
        """Uninitialised (weight [rows, cols], scale [rows]) on the default device."""
        weight = nn.Parameter(torch.empty(rows, cols, dtype=self.dtype), requires_grad=False)
        scale = nn.Parameter(torch.empty(rows, dtype=torch.float32), requires_grad=False)
        return weight, scale


FORMATS = {
    "int8": WeightFormat("int8", torch.int8, reference.quantize_int8),
    "fp8": WeightFormat("fp8", torch.float8_e4m3fn, reference.quantize_fp8),
}


def weight_format(method: str | None) -> WeightFormat | None:
    """The format of a quantization method; None for unquantized (the model dtype)."""
    if method is None:
        return None
    fmt = FORMATS.get(method)
    if fmt is None:
        raise ValueError(f"quantization: unknown method {method!r} (choose from "
                         f"{', '.join(FORMATS)})")
    return fmt


FP8_MIN_CAPABILITY = (8, 9)  # e4m3 tensor cores and conversions: Ada, Hopper and later


def supports_fp8(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= FP8_MIN_CAPABILITY


def check_device(method: str | None, device: torch.device) -> None:
    """Raise, before anything is built, when `device` cannot run `method`."""
    if method != "fp8" or device.type != "cuda":
        return
    if not supports_fp8(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"quantization fp8 needs FP8 tensor cores (compute capability >= "
            f"{FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]}: Ada, Hopper or later); "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}: use --quantization int8"
        )


# the attribute marking a scale as filled by its weight's loader (the loader's plan does not
# look for it in the checkpoint)
_FILLED_WITH_WEIGHT = "filled_with_weight"


def mark_filled_with_weight(param: nn.Parameter) -> None:
    setattr(param, _FILLED_WITH_WEIGHT, True)


def is_filled_with_weight(param: nn.Parameter) -> bool:
    return bool(getattr(param, _FILLED_WITH_WEIGHT, False))
