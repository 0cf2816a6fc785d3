"""Per-prompt logits from a flatout model (one flattened batch) and from a transformers model."""

from __future__ import annotations

import torch

from flatout.layers.attention import AttentionMetadata, forward_context


def random_prompts(vocab_size: int, lens: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g) for n in lens]


@torch.no_grad()
def flatout_logits(model: torch.nn.Module, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """All prompts in one forward without a KV cache; logits of every position, per prompt."""
    lens = [len(p) for p in prompts]
    ids = torch.cat(prompts)  # [T]
    device = ids.device  # the metadata lives where the prompts (and the model) are
    positions = torch.cat([torch.arange(n, device=device) for n in lens])  # [T]
    with forward_context(AttentionMetadata.for_prefill_without_cache(lens, device=device)):
        hidden = model(ids, positions)  # [T, hidden]
    return list(model.compute_logits(hidden).split(lens))


@torch.no_grad()
def hf_logits(model: torch.nn.Module, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
    """transformers' logits, one prompt at a time (no padding)."""
    return [model(p[None]).logits[0].float() for p in prompts]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))
