"""The engine on the GPU (Triton kernels, CUDA graphs) matches transformers token for token on
tiny fp32 checkpoints; run through the device tool, skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from flatout import LLM, SamplingParams
from tests.helpers.tiny_checkpoints import load_hf_reference, make_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
LENS = [3, 70, 17, 41, 1, 33]
NEW = 16


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("GlmForCausalLM", {}), ("Glm4ForCausalLM", {}), ("ChatGLMModel", {}),
     ("Qwen3ForCausalLM", {}),
     ("LlamaForCausalLM", {"head_dim": 80, "num_attention_heads": 6, "num_key_value_heads": 2,
                           "hidden_size": 96, "vocab_size": 307})],
)
@pytest.mark.parametrize("eager", [False, True])
def test_greedy_matches_transformers(tmp_path, arch: str, overrides: dict, eager: bool) -> None:  # noqa: ANN001
    path = make_tiny_checkpoint(arch, tmp_path / arch, **overrides)
    hf = load_hf_reference(path)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist() for n in LENS]
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                              min_new_tokens=NEW, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
            expected.append(out[0, len(p):].tolist())
    # a small budget forces chunked prefill beside decodes; a small cache forces preemption
    llm = LLM(str(path), dtype="float32", block_size=16, num_kv_blocks=20,
              max_num_batched_tokens=32, max_num_seqs=8, enforce_eager=eager)
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    outs = llm.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    again = llm.generate(prompts, params)  # prefix-cache hits
    assert [o.token_ids for o in again] == expected
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0


@pytest.mark.parametrize("eager", [False, True])
def test_fp8_kv_cache_agrees_with_the_reference_path(tmp_path, eager: bool) -> None:  # noqa: ANN001
    """--kv-cache-dtype fp8 on the GPU (Triton KV write and attention over float8_e4m3fn, CUDA
    graphs) gives the tokens of the CPU's PyTorch references over the same fp8 cache."""
    path = make_tiny_checkpoint("GlmForCausalLM", tmp_path / "glm")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 301, (n,), generator=g).tolist() for n in LENS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    kw = dict(dtype="float32", kv_cache_dtype="fp8", block_size=16, num_kv_blocks=64,
              max_num_batched_tokens=32, max_num_seqs=8)
    gpu = LLM(str(path), enforce_eager=eager, **kw)
    assert gpu.engine.core.runner.attn_layers[0].k_cache.dtype == torch.float8_e4m3fn
    cpu = LLM(str(path), device="cpu", **kw)
    got = [o.token_ids for o in gpu.generate(prompts, params)]
    want = [o.token_ids for o in cpu.generate(prompts, params)]
    same = sum(a == b for x, y in zip(got, want, strict=True) for a, b in zip(x, y, strict=True))
    assert same >= 0.9 * len(LENS) * NEW, (got, want)
