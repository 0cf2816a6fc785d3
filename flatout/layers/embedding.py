"""Token embedding and LM head, both split over the vocabulary across tensor-parallel ranks.

Rank r holds rows [r * per_rank, (r + 1) * per_rank) of the vocabulary, with per_rank =
ceil(vocab / tp_size); rows past the real vocabulary are zero padding that never leaves the layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from flatout import distributed
from flatout.kernels.ops import ops_for
from flatout.layers.linear import ShardId, copy_checked, new_parameter, set_weight_loader


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank = distributed.get_tp_rank()
        self.tp_size = distributed.get_tp_size()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_rank = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_rank
        self.vocab_end = min(self.vocab_start + self.num_embeddings_per_rank, num_embeddings)
        self.weight = new_parameter(self.num_embeddings_per_rank, embedding_dim)
        set_weight_loader(self.weight, self.weight_loader)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId | None = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"unsharded parameter got shard id {shard_id!r}")
        if tuple(loaded.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"shape mismatch: expected {(self.num_embeddings, self.embedding_dim)}, "
                f"got {tuple(loaded.shape)}"
            )
        n = self.vocab_end - self.vocab_start
        copy_checked(param.data[:n], loaded[self.vocab_start : self.vocab_end])
        param.data[n:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, hidden]
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        mine = (input_ids >= self.vocab_start) & (input_ids < self.vocab_end)
        local = torch.where(mine, input_ids - self.vocab_start, 0)
        out = F.embedding(local, self.weight).masked_fill(~mine[:, None], 0)
        return distributed.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects hidden states onto the vocabulary; may share its weight with the embedding."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ops = ops_for()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] fp32
        logits = self.ops.linear(hidden, self.weight, None)  # [N, vocab_per_rank]
        if self.tp_size > 1:
            logits = distributed.all_gather(logits, dim=-1)[:, : self.num_embeddings]
        return logits.float()
