"""ChatGLM-6B v1 on the GPU: the prefix-bidirectional prefill kernel at the real head shape
against its reference, and the engine (Triton kernels, CUDA graphs over [B, 2] positions) against
the dense reference on a tiny fp32 checkpoint. Skipped without CUDA."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # before importing the kernels: CPU runs use the interpreter
    pytest.skip("needs CUDA", allow_module_level=True)
if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    pytest.skip("TRITON_INTERPRET is set: these tests need compiled kernels",
                allow_module_level=True)  # fmt: skip
pytest.importorskip("triton")

from flatout import LLM, SamplingParams  # noqa: E402
from flatout.kernels import reference  # noqa: E402
from flatout.kernels.prefill_attention import paged_prefill_attention  # noqa: E402
from tests.kernels.paged_batch import make_paged_batch  # noqa: E402
from tests.models.chatglm_v1_reference import (  # noqa: E402
    GMASK,
    SOP,
    DenseChatGLMv1,
    make_tiny_v1_checkpoint,
)

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefix_prefill_kernel_at_chatglm_6b_shape(dtype):
    chunks = [(512, 512), (1, 700), (37, 1037), (0, 0), (129, 300), (3, 3), (900, 1900)]
    prefixes = [511, 699, 1036, 0, 299, 2, 1899]
    batch = make_paged_batch(chunks, 32, 32, 128, 16, dtype=dtype, device="cuda", pad_tokens=5)
    prefix = torch.tensor(prefixes, dtype=torch.int32, device="cuda")
    args = [batch.q, batch.k_cache, batch.v_cache, batch.query_start_loc, batch.seq_lens,
            batch.block_tables, batch.scale, batch.meta.max_query_len]  # fmt: skip
    n = batch.num_real_tokens
    out = paged_prefill_attention(*args, prefix_lens=prefix)[:n]
    up = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    ref = reference.paged_prefill_attention(*up, prefix_lens=prefix)[:n]
    assert torch.isfinite(out).all()
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)
    torch.testing.assert_close(out.float(), ref, **tol)


@pytest.mark.parametrize("eager", [False, True])
def test_engine_equals_the_dense_reference(tmp_path, eager: bool) -> None:  # noqa: ANN001
    path = make_tiny_v1_checkpoint(tmp_path / "v1")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, 130, (n,), generator=g).tolist() + [GMASK, SOP]
               for n in (3, 70, 17, 41, 1, 33)]
    ref = DenseChatGLMv1(path)
    with torch.no_grad():
        expected = [ref.greedy(p, 12) for p in prompts]
    llm = LLM(str(path), device="cuda", dtype="float32", enforce_eager=eager, block_size=16,
              num_kv_blocks=64, max_num_batched_tokens=64)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == expected
