"""Quantized weight formats of the parallel linears and the LM head.

A quantized layer is the same layer holding another weight format: `weight` in the format's
storage dtype (int8 or float8_e4m3fn) [out, in] plus `weight_scale` (fp32, one per output
channel), with weight ~= q * scale[:, None]. The layer's weight loader quantizes each
full-precision checkpoint row as it arrives (`WeightFormat.quantize`), so the tensor-parallel
sharding code is the dense one: rows are quantized independently, and a row-parallel layer
quantizes the whole row before keeping its columns, so every rank holds the scales of the
unsplit checkpoint. The format also names the op that multiplies with it (flatout.kernels.ops).

4-bit weights (W4A16, `Int4Format`: methods "w4a16[-g<size>|-channel][-asym]", plain "w4a16"
being groups of 128 inputs, symmetric) are packed two per byte along K (`weight` uint8
[out, in / 2]) with fp32 `weight_scale` [out, groups] and, when asymmetric, uint8
`weight_zero_point` [out, groups] (reference.py has the layout). A column-parallel layer keeps
its rows of all three; a row-parallel one keeps its columns of the weight and its groups of the
scales and zero points, so its inputs per rank must be whole groups (checked when it is built).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from flatout.config import parse_int4_method
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


INT4_METHOD = "w4a16"


@dataclass(frozen=True)
class Int4Format:
    """4-bit weights with a scale (and a zero point when asymmetric) per group of inputs."""

    group_size: int  # inputs per scale; 0: one scale per output channel (the whole row)
    zero_point: bool  # asymmetric: a uint8 zero point per group (else 8)

    @property
    def method(self) -> str:
        group = "channel" if self.group_size == 0 else f"g{self.group_size}"
        return f"{INT4_METHOD}-{group}" + ("-asym" if self.zero_point else "")

    def groups(self, cols: int) -> int:
        """Scale groups of a row of `cols` inputs; ValueError where they do not tile it."""
        if cols % 2:
            raise ValueError(f"quantization {self.method}: {cols} inputs per rank is odd (4-bit "
                             "weights are packed two per byte)")
        if self.group_size == 0:
            return 1
        if cols % self.group_size:
            raise ValueError(f"quantization {self.method}: {cols} inputs per rank are not whole "
                             f"groups of {self.group_size} (a row-parallel layer splits its "
                             "inputs over the tensor-parallel ranks: use a size that divides "
                             "them into whole groups)")
        return cols // self.group_size

    def quantize(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Full-precision rows [r, K] -> (q uint8 0..15 [r, K], scale [r, G], zero or None)."""
        return reference.quantize_w4(rows, self.group_size, self.zero_point)

    def new_parameters(self, rows: int, cols: int
                       ) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter | None]:
        """Uninitialised (packed weight [rows, cols / 2], scale [rows, G], zero points or
        None) on the default device."""
        groups = self.groups(cols)
        weight = nn.Parameter(torch.empty(rows, cols // 2, dtype=torch.uint8),
                              requires_grad=False)
        scale = nn.Parameter(torch.empty(rows, groups, dtype=torch.float32), requires_grad=False)
        zero = None
        if self.zero_point:
            zero = nn.Parameter(torch.empty(rows, groups, dtype=torch.uint8), requires_grad=False)
        return weight, scale, zero


def int4_format(method: str) -> Int4Format | None:
    """The 4-bit format a method names ("w4a16", "w4a16-g64", "w4a16-channel-asym", ...), or
    None for a method of another family; ValueError for a malformed 4-bit one."""
    parsed = parse_int4_method(method)
    return None if parsed is None else Int4Format(*parsed)


def weight_format(method: str | None) -> WeightFormat | Int4Format | None:
    """The format of a quantization method; None for unquantized (the model dtype)."""
    if method is None:
        return None
    fmt = FORMATS.get(method) or int4_format(method)
    if fmt is None:
        raise ValueError(f"quantization: unknown method {method!r} (choose from "
                         f"{', '.join(FORMATS)}, {INT4_METHOD})")
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
