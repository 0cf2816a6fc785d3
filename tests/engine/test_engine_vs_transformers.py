"""Greedy generation through the whole engine equals transformers' generate, token for token,
for every architecture: mixed prompt lengths, chunked prefill, preemption, prefix-cache hits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatout import LLM, SamplingParams
from tests.helpers.tiny_checkpoints import load_hf_reference, make_tiny_checkpoint

ARCHS = [
    "GlmForCausalLM",
    "Glm4ForCausalLM",
    "ChatGLMModel",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Glm4ForCausalLM:odd",
    "LlamaForCausalLM:odd",
]
# uncommon shapes: head_dim 80, 6 query heads on 2 KV heads (GQA ratio 3), odd vocab
ODD_SHAPES = {"head_dim": 80, "num_attention_heads": 6, "num_key_value_heads": 2,
              "vocab_size": 307, "hidden_size": 96}
PROMPT_LENS = [3, 70, 17, 41]
NEW_TOKENS = 12


def prompts_for(vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:  # noqa: ANN001
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


@pytest.fixture(scope="module", params=ARCHS)
def checkpoint(request, tmp_path_factory) -> tuple[str, Path, list[list[int]], list[list[int]]]:  # noqa: ANN001
    arch, _, variant = request.param.partition(":")
    overrides = ODD_SHAPES if variant == "odd" else {}
    path = make_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch), **overrides)
    hf = load_hf_reference(path)
    hf.generation_config.eos_token_id = None
    prompts = prompts_for(hf.config.vocab_size)
    with torch.no_grad():
        expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    return arch, path, prompts, expected


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_batch_of_mixed_lengths(checkpoint) -> None:  # noqa: ANN001
    _, path, prompts, expected = checkpoint
    llm = LLM(str(path), block_size=4, num_kv_blocks=256)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" for o in outs)
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0


def test_chunked_prefill(checkpoint) -> None:  # noqa: ANN001
    _, path, prompts, expected = checkpoint
    llm = LLM(str(path), block_size=4, num_kv_blocks=256, max_num_batched_tokens=9)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert llm.engine.stats.num_steps > sum(PROMPT_LENS) // 9


def test_preemption(checkpoint) -> None:  # noqa: ANN001
    _, path, prompts, expected = checkpoint
    # 24 blocks of 4 = 96 slots, while the four requests need 131 + 48 tokens together
    llm = LLM(str(path), block_size=4, num_kv_blocks=24, enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0


def test_prefix_cache_hits(checkpoint) -> None:  # noqa: ANN001
    _, path, prompts, expected = checkpoint
    llm = LLM(str(path), block_size=4, num_kv_blocks=256, enable_prefix_caching=True)
    first = llm.generate(prompts, GREEDY)
    computed_first = llm.engine.stats.num_prefill_tokens
    second = llm.generate(prompts, GREEDY)
    computed_second = llm.engine.stats.num_prefill_tokens - computed_first
    assert [o.token_ids for o in first] == expected
    assert [o.token_ids for o in second] == expected
    assert computed_second < computed_first / 2
    assert sum(o.num_cached_tokens for o in second) > 0
    llm.engine.block_manager.check_integrity()
