"""Quantized linears on CUDA against their references: W8A16 int8 (GEMV for decode rows,
converted weight + cuBLAS for prefill) and W8A8 FP8 through torch._scaled_mm, eager and
replayed in a CUDA graph. Skipped without CUDA (FP8 also without compute capability 8.9)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: these tests need compiled kernels",
                allow_module_level=True)  # fmt: skip

from flatout.kernels import reference  # noqa: E402
from flatout.kernels.fp8_linear import linear_w8a8_fp8  # noqa: E402
from flatout.kernels.gemv import linear_w8a16  # noqa: E402
from flatout.layers.quantization import supports_fp8  # noqa: E402

pytestmark = pytest.mark.gpu
SHAPES = [(4608, 4096), (4096, 13696), (48, 96)]  # GLM-4-9B qkv, down; untileable for FP8
CUDA = torch.device("cuda")


def _graph_replay(fn, *args):  # one capture, one replay, after a warm-up on a side stream
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn(*args)
    g.replay()
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("rows", [1, 32, 128, 256, 300, 4096])
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_linear_matches_reference(method: str, rows: int, n: int, k: int) -> None:
    if method == "fp8" and not supports_fp8(CUDA):
        pytest.skip("no FP8 tensor cores")
    g = torch.Generator(CUDA).manual_seed(0)
    w = torch.randn(n, k, device=CUDA, generator=g) / k**0.5
    x = torch.randn(rows, k, device=CUDA, generator=g).bfloat16()
    b = torch.randn(n, device=CUDA, generator=g).bfloat16()
    quantize, kernel, oracle = {
        "int8": (reference.quantize_int8, linear_w8a16, reference.linear_w8a16),
        "fp8": (reference.quantize_fp8, linear_w8a8_fp8, reference.linear_w8a8_fp8),
    }[method]
    q, s = quantize(w)
    want = oracle(x.float(), q, s, b.float())
    for got in (kernel(x, q, s, b), _graph_replay(kernel, x, q, s, b)):
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        rel = ((got.float() - want).norm() / want.norm()).item()
        assert rel < 1e-2, rel


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_engine_same_tokens_with_and_without_cuda_graphs(tmp_path, method) -> None:
    """Decode replayed from CUDA graphs runs the same quantized kernels as eager steps."""
    if method == "fp8" and not supports_fp8(CUDA):
        pytest.skip("no FP8 tensor cores")
    from flatout import LLM, SamplingParams
    from tests.helpers.tiny_checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint("GlmForCausalLM", tmp_path / "glm")
    prompts = [[5, 17, 42, 99, 7, 3], list(range(10, 90)), [200, 201]]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    outs = []
    for eager in (True, False):
        llm = LLM(str(path), quantization=method, enforce_eager=eager, max_model_len=256,
                  num_kv_blocks=64)
        try:
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        finally:
            llm.engine.core.shutdown()
    assert outs[0] == outs[1]


@pytest.mark.parametrize("rows", [65, 256])
@pytest.mark.parametrize("weights", ["int8", "fp8", "fp8-e4m3-dot"])
def test_row_blocked_gemv_on_the_gpu(weights: str, rows: int) -> None:
    from flatout.kernels.gemv import GemvConfig, gemv

    if weights.startswith("fp8") and not supports_fp8(CUDA):
        pytest.skip("no FP8 tensor cores")
    g = torch.Generator(CUDA).manual_seed(1)
    w = torch.randn(4104, 4096, device=CUDA, generator=g) / 64  # N not a multiple of the tile
    x = torch.randn(rows, 4096, device=CUDA, generator=g).bfloat16()
    quantize, oracle = ((reference.quantize_int8, reference.linear_w8a16) if weights == "int8"
                        else (reference.quantize_fp8, reference.linear_w8a8_fp8))
    q, s = quantize(w)
    cfg = GemvConfig(64, 128, 4, 3, block_m=64, fp8_dot=weights == "fp8-e4m3-dot")
    got = gemv(x, q, None, config=cfg, scale=s)
    want = oracle(x.float(), q, s, None)
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


def test_fused_fp8_row_quantize_on_the_gpu() -> None:
    from flatout.kernels.fp8_linear import quantize_fp8_per_token

    x = torch.randn(300, 13696, device=CUDA).bfloat16() * 5
    x[7] = 0
    q, s = quantize_fp8_per_token(x)
    q_ref, s_ref = reference.quantize_fp8_per_token(x)
    torch.testing.assert_close(s, s_ref)
    # the kernel's fp32 division may round a value to the neighbouring e4m3 step
    torch.testing.assert_close(q.float(), q_ref.float(), atol=2**-9, rtol=1 / 8)
