"""Helpers shared by the kernel launchers (host side only)."""

from __future__ import annotations

import functools
import os

import torch
import triton.language as tl

# Triton decides at decoration time whether `@triton.jit` builds interpreted kernels, from this
# variable; we read it the same way so the launchers pick interpreter-safe settings.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_dtype(dtype: torch.dtype) -> tl.dtype:
    """Operand type for `tl.dot` on tensors stored as `dtype`.

    On the GPU, 16-bit inputs go to the tensor cores as they are (fp32 accumulation). Under the
    interpreter everything is upcast to fp32, because it rounds bf16 arithmetic wrongly."""
    if INTERPRET or dtype == torch.float32:
        return tl.float32
    if dtype not in _TL_DTYPES:
        raise TypeError(f"unsupported dtype {dtype} (float32, float16 or bfloat16)")
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 products in true fp32 ("ieee"), not tf32, so fp32 runs match the reference."""
    return "ieee" if dot_dtype(dtype) == tl.float32 else "tf32"


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on `device` (a fixed 8 for CPU tensors under the interpreter)."""
    if device.type != "cuda":
        return 8
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)
