"""Compile every kernel for an H100 (sm_90) on a machine without a GPU and report resources.

The interpreter runs kernels without compiling them, so it cannot catch what only the compiler
rejects (tensor-core shape limits, constexpr types, shared memory). This script swaps in a driver
that only names an sm_90 target and turns every launch into a compile-only warmup, calls the
public kernel functions on CPU tensors at real shapes, and prints one JSON line per kernel
variant: name, dtype, registers, spilled bytes, shared memory (from ptxas -v).

Run in a process without TRITON_INTERPRET. Exit code 3: this Triton's internals differ from what
the shim expects (nothing compiled)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton

try:
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
except ImportError:
    sys.exit(3)


class _CompileOnlyDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED: list[tuple[str, object]] = []


def _install() -> None:
    driver.set_active(_CompileOnlyDriver())
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        kernel = original(self, *args, grid=grid, warmup=True, **kwargs)
        COMPILED.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = run


def _launch_all(dtype: torch.dtype) -> None:
    from flatout.kernels.activation import silu_and_mul
    from flatout.kernels.allreduce import one_shot_add_rms_norm
    from flatout.kernels.decode_attention import paged_decode_attention
    from flatout.kernels.kv_cache import write_kv_cache
    from flatout.kernels.norm import fused_add_rms_norm, rms_norm
    from flatout.kernels.prefill_attention import paged_prefill_attention
    from flatout.kernels.rotary import rotary_embedding
    from tests.kernels.paged_batch import make_paged_batch

    # GLM-4-9B attention (G = 16, D = 128) and an awkward one (G = 3, D = 80)
    for heads, kv_heads, head_dim, block_size in [(32, 2, 128, 16), (6, 2, 80, 8)]:
        b = make_paged_batch([(1, 40), (3, 50)], heads, kv_heads, head_dim, block_size,
                             dtype=dtype)  # fmt: skip
        decode_args = (b.q[:2], b.k_cache, b.v_cache, b.block_tables, b.seq_lens, 0.1)
        paged_decode_attention(*decode_args, num_splits=4)
        paged_decode_attention(*decode_args, num_splits=1)
        paged_prefill_attention(b.q, b.k_cache, b.v_cache, b.query_start_loc, b.seq_lens,
                                  b.block_tables, 0.1, 3)  # fmt: skip
        write_kv_cache(b.q[:, :kv_heads], b.q[:, :kv_heads], b.k_cache, b.v_cache,
                         b.slot_mapping)  # fmt: skip
        # --kv-cache-dtype fp8: the same kernels over a float8_e4m3fn cache with scales
        k8, v8 = b.k_cache.to(torch.float8_e4m3fn), b.v_cache.to(torch.float8_e4m3fn)
        ks = vs = torch.ones(())
        paged_decode_attention(b.q[:2], k8, v8, b.block_tables, b.seq_lens, 0.1, ks, vs,
                               num_splits=4)  # fmt: skip
        paged_decode_attention(b.q[:2], k8, v8, b.block_tables, b.seq_lens, 0.1, ks, vs,
                               num_splits=1)  # fmt: skip
        paged_prefill_attention(b.q, k8, v8, b.query_start_loc, b.seq_lens, b.block_tables,
                                0.1, 3, ks, vs)  # fmt: skip
        write_kv_cache(b.q[:, :kv_heads], b.q[:, :kv_heads], k8, v8, b.slot_mapping, ks, vs)
    x = torch.zeros(4, 4096, dtype=dtype)
    rms_norm(x, x[0], 1e-5)
    fused_add_rms_norm(x, x, x[0], 1e-5)
    silu_and_mul(x)
    ptrs = torch.zeros(2, dtype=torch.int64)  # two ranks' buffers and flags (never read here)
    one_shot_add_rms_norm(ptrs, ptrs, 1, x, x[0], 1e-5)
    one_shot_add_rms_norm(ptrs, ptrs, 0, torch.zeros(200, 4096, dtype=dtype), x[0], 1e-5)
    positions = torch.zeros(4, dtype=torch.int64)
    rotary_embedding(positions, x, x[:, :256], torch.zeros(8, 64), 128, True)
    rotary_embedding(positions, x, x[:, :1024], torch.zeros(8, 128), 128, False)
    # W4A16 at GLM-4-9B's qkv shape, groups of 128, symmetric and with zero points: decode rows
    # in one program (1, 32, 64), row blocks (200) and prefill's dequantize
    from flatout.kernels.w4a16 import dequantize_w4, gemv_w4a16

    n, k = 4608, 4096
    packed, scale = torch.zeros(n, k // 2, dtype=torch.uint8), torch.ones(n, k // 128)
    for zero in (None, torch.zeros(n, k // 128, dtype=torch.uint8)):
        for m in (1, 32, 64, 200):
            gemv_w4a16(torch.zeros(m, k, dtype=dtype), packed, scale, zero,
                       torch.zeros(n, dtype=dtype))
        dequantize_w4(packed, scale, zero, dtype)


def _ptxas_report(ptx: str) -> dict:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        proc = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)  # fmt: skip
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spills = re.search(r"(\d+) bytes spill stores", proc.stderr)
    return {"registers": int(regs.group(1)), "spill_bytes": int(spills.group(1))}


def main() -> None:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET")
    try:
        _install()
    except (AttributeError, TypeError):
        sys.exit(3)
    for dtype in (torch.bfloat16, torch.float16):
        start = len(COMPILED)
        _launch_all(dtype)
        for name, kernel in COMPILED[start:]:
            report = {"kernel": name, "dtype": str(dtype), "shared": kernel.metadata.shared,
                      **_ptxas_report(kernel.asm["ptx"])}  # fmt: skip
            print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
