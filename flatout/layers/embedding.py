"""Token embedding and LM head, both split over the vocabulary across tensor-parallel ranks.

Rank r holds rows [r * per_rank, (r + 1) * per_rank) of the vocabulary, with per_rank =
ceil(vocab / tp_size); rows past the real vocabulary are zero padding that never leaves the layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flatout import distributed
from flatout.kernels.ops import ops_for
from flatout.layers.linear import ShardId, copy_checked, new_parameter, set_weight_loader
from flatout.layers.quantization import Int4Format, mark_filled_with_weight, weight_format


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
    """Projects hidden states onto the vocabulary; may share its weight with the embedding.

    With `quantization` its weight is int8 / e4m3 with a scale per vocabulary row (padding rows:
    q 0, scale 1), quantized on load as the parallel linears are."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, quantization: str | None = None
    ) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.ops = ops_for()
        self.params_dtype = torch.get_default_dtype()
        fmt = weight_format(quantization)
        if isinstance(fmt, Int4Format):
            raise ValueError(f"quantize_lm_head: the LM head cannot be held in 4 bits "
                             f"({fmt.method}); drop --quantize-lm-head")
        self.weight_format = fmt
        self.weight_scale: nn.Parameter | None = None
        if self.weight_format is not None:
            self.weight, self.weight_scale = self.weight_format.new_parameters(
                self.num_embeddings_per_rank, embedding_dim
            )
            set_weight_loader(self.weight, self.weight_loader)
            mark_filled_with_weight(self.weight_scale)
            self.quantized_linear = self.weight_format.kernel(self.ops)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId | None = None
    ) -> None:
        if self.weight_format is None or self.weight_scale is None:
            super().weight_loader(param, loaded, shard_id)
            return
        if shard_id is not None:
            raise ValueError(f"unsharded parameter got shard id {shard_id!r}")
        if tuple(loaded.shape) != (self.num_embeddings, self.embedding_dim):
            raise ValueError(
                f"shape mismatch: expected {(self.num_embeddings, self.embedding_dim)}, "
                f"got {tuple(loaded.shape)}"
            )
        self.store_rows(loaded[self.vocab_start : self.vocab_end])

    def store_rows(self, rows: torch.Tensor) -> None:
        """This rank's vocabulary rows (full precision), quantized; the padding after them
        zeroed."""
        assert self.weight_format is not None and self.weight_scale is not None
        n = rows.shape[0]
        q, scale = self.weight_format.quantize(rows)
        copy_checked(self.weight.data[:n], q)
        self.weight.data[n:].view(torch.uint8).zero_()  # byte 0 is 0 in int8 and e4m3
        copy_checked(self.weight_scale.data[:n], scale)
        self.weight_scale.data[n:] = 1.0

    def fill_dummy(self, low: float, high: float, generator: torch.Generator) -> None:
        """Random rows stored in the head's quantized format (load_format=dummy)."""
        n = self.vocab_end - self.vocab_start
        rows = torch.empty(n, self.embedding_dim, dtype=self.params_dtype,
                           device=self.weight.device)
        self.store_rows(rows.uniform_(low, high, generator=generator))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, vocab] fp32
        if self.weight_scale is None:
            logits = self.ops.linear(hidden, self.weight, None)  # [N, vocab_per_rank]
        else:
            logits = self.quantized_linear(hidden, self.weight, self.weight_scale, None)
        if self.tp_size > 1:
            logits = distributed.all_gather(logits, dim=-1)[:, : self.num_embeddings]
        return logits.float()
