"""W4A16 on CUDA against its reference: the compiled GEMV (one program's rows, row blocks) and
dequantize + cuBLAS for prefill, symmetric and with zero points, eager and replayed in a CUDA
graph, and a tiny 4-bit model's greedy tokens with and without CUDA graphs."""

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
from flatout.kernels.w4a16 import dequantize_w4, linear_w4a16  # noqa: E402

pytestmark = pytest.mark.gpu
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


@pytest.mark.parametrize("rows", [1, 7, 32, 64, 65, 128, 256, 300, 4096])
@pytest.mark.parametrize(("n", "k", "group"), [(4608, 4096, 128), (4096, 13696, 128),
                                               (48, 96, 32), (40, 70, 0)])
@pytest.mark.parametrize("zero_point", [False, True])
def test_w4a16_matches_reference(rows: int, n: int, k: int, group: int, zero_point: bool
                                 ) -> None:
    g = torch.Generator(CUDA).manual_seed(0)
    w = torch.randn(n, k, device=CUDA, generator=g) / k**0.5
    x = torch.randn(rows, k, device=CUDA, generator=g).bfloat16()
    b = torch.randn(n, device=CUDA, generator=g).bfloat16()
    q, s, z = reference.quantize_w4(w, group, zero_point)
    p = reference.pack_int4(q)
    want = reference.linear_w4a16(x.float(), p, s, z, b.float())
    for got in (linear_w4a16(x, p, s, z, b), _graph_replay(linear_w4a16, x, p, s, z, b)):
        assert got.dtype == torch.bfloat16 and got.shape == (rows, n)
        rel = ((got.float() - want).norm() / want.norm()).item()
        assert rel < 1e-2, rel
    assert torch.equal(dequantize_w4(p, s, z, torch.float32), reference.dequantize_w4(p, s, z))


def test_w4a16_engine_same_tokens_with_and_without_cuda_graphs(tmp_path) -> None:
    from flatout import LLM, SamplingParams
    from tests.helpers.tiny_checkpoints import make_tiny_checkpoint

    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "llama")
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[5, 17, 42, 99], list(range(10, 50))]
    outs = []
    for eager in (True, False):
        llm = LLM(str(path), quantization="w4a16-g32-asym",
                  enforce_eager=eager, max_model_len=128, num_kv_blocks=32)
        try:
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        finally:
            llm.engine.core.shutdown()
    assert outs[0] == outs[1]
