"""Kernel tests run on CPU under the Triton interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` function is decorated, i.e. before
flatout.kernels is imported, so it is set here at collection time."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")


def _fix_interpreter_scalar_index() -> None:
    """Triton 3.6's interpreter turns a scalar into a Python int with `int(array_of_shape_1)`,
    which numpy >= 2.4 refuses, so `range(start, end)` over loaded bounds fails
    (triton-lang/triton#9171). Re-patch `__index__` to take the single element explicitly."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "flatout_fixed", False):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.flatout_fixed = True
    interpreter._patch_lang_tensor = patched


def _fix_interpreter_fp8_rounding() -> None:
    """The interpreter's float -> float8_e4m3fn conversion drops the carry when rounding up
    crosses a power of two (125.8 -> 64, not 128), rounds ties away from zero and flushes
    subnormals; GPUs convert with round-to-nearest-even, as torch does. Convert through torch."""
    import numpy as np
    import torch
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_fp_to_fp
    if getattr(original, "flatout_fixed", False):
        return

    def create_fp_to_fp(self, src, dst_type, rounding_mode):
        if dst_type.scalar != tl.float8e4nv or src.dtype.scalar not in (tl.float32, tl.float16):
            return original(self, src, dst_type, rounding_mode)
        values = torch.from_numpy(np.ascontiguousarray(src.data).astype(np.float32))
        data = values.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return interpreter.TensorHandle(data, dst_type.scalar)

    create_fp_to_fp.flatout_fixed = True
    builder.create_fp_to_fp = create_fp_to_fp


if os.environ["TRITON_INTERPRET"] == "1":
    _fix_interpreter_scalar_index()
    _fix_interpreter_fp8_rounding()

# These tests pass CPU tensors, which only interpreted kernels accept. If the kernels were already
# imported compiled in this session (tests/gpu collected first on a CUDA machine), skip the folder.
_utils = sys.modules.get("flatout.kernels._utils")
if os.environ["TRITON_INTERPRET"] != "1" or (_utils is not None and not _utils.INTERPRET):
    collect_ignore_glob = ["test_*.py"]
    warnings.warn(
        "tests/kernels skipped: flatout.kernels was imported before TRITON_INTERPRET=1 was set "
        "(set it in the environment to run these CPU tests)",
        stacklevel=1,
    )
