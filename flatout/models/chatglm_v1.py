"""ChatGLM-6B v1 (THUDM/chatglm-6b, `position_encoding_2d`): the GLM-130B-style decoder.

Per layer, with alpha = sqrt(2 * num_layers) (a DeepNorm-like residual on the normed input):
    a = LN1(x);  h = alpha * a + Attn(a);  b = LN2(h);  out = alpha * b + MLP(b)
LayerNorms and every linear carry a bias; the MLP is dense_4h_to_h(gelu_tanh(dense_h_to_4h)).

The fused query_key_value is per-head interleaved in the checkpoint (rows = head, then q|k|v,
then dims); its weight loader regroups the rows into q|k|v blocks, the layout of
QKVParallelLinear, before the usual split by heads.

2-D rotary: each head's first half is rotated by the token's position id, its second half by its
block position id (NeoX halves within each 64-dim half). The positions come in as [T, 2] (the
runner builds them from the prompt layout, engine/batch.py `PrefixLayout`). As the checkpoint's
code computes its tables in fp16, the angles position * inv_freq and the cos/sin values are
rounded to fp16 before use (at 2048 positions the angle's fp16 rounding is far from negligible,
and the model was trained with it).

Attention over the prompt is prefix-bidirectional; the attention layer reads each sequence's
bidirectional length from the forward's metadata (`AttentionMetadata.prefix_lens`).

Parameter names are the checkpoint's (`transformer.*`, `lm_head.*`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from flatout.config import ModelConfig
from flatout.kernels.ops import ops_for
from flatout.layers.activation import GeluTanh
from flatout.layers.attention import Attention
from flatout.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from flatout.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    ShardId,
    get_weight_loader,
    set_weight_loader,
)
from flatout.layers.norm import LayerNorm
from flatout.models.decoder import lm_head_quantization


class Rotary2D(nn.Module):
    """Rotates each head's two halves by the two position ids ([T, 2]: position, block)."""

    def __init__(self, head_dim: int, max_position: int, base: float) -> None:
        super().__init__()
        self.half_dim = head_dim // 2
        exponents = torch.arange(0, self.half_dim, 2, dtype=torch.float32) / self.half_dim
        inv_freq = (1.0 / base**exponents).half()
        pos = torch.arange(max_position, dtype=torch.float32).half()
        angles = (pos[:, None] * inv_freq[None, :]).float()  # [P, half / 2], fp16-rounded
        cache = torch.cat([angles.cos(), angles.sin()], dim=-1).half().float()  # cos | sin
        self.cos_sin_cache: torch.Tensor
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self.ops = ops_for()

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T, 2]; q [T, H*D], k [T, KVH*D] -> rotated copies."""
        t, r = q.shape[0], self.half_dim
        # [T, H, 2, r] -> [T, 2, H, r]: all first halves, then all second halves
        qh = q.reshape(t, -1, 2, r).transpose(1, 2).reshape(t, -1)
        kh = k.reshape(t, -1, 2, r).transpose(1, 2).reshape(t, -1)
        nq, nk = qh.shape[1] // 2, kh.shape[1] // 2
        for axis, (qs, ks) in enumerate([(slice(0, nq), slice(0, nk)),
                                         (slice(nq, None), slice(nk, None))]):
            self.ops.rotary_embedding(positions[:, axis].contiguous(), qh[:, qs], kh[:, ks],
                                      self.cos_sin_cache, r, False)
        q = qh.view(t, 2, -1, r).transpose(1, 2).reshape(t, -1)
        k = kh.view(t, 2, -1, r).transpose(1, 2).reshape(t, -1)
        return q, k


def _per_head_qkv_loader(layer: QKVParallelLinear, num_heads: int, head_dim: int) -> None:
    """Make the layer's weight and bias accept the checkpoint's per-head interleaved rows."""

    def load(param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId | None = None) -> None:
        if shard_id is None:  # rows (head, q|k|v, dim) -> (q|k|v, head, dim)
            grouped = loaded.reshape(num_heads, 3, head_dim, -1).transpose(0, 1)
            loaded = grouped.reshape(loaded.shape)
        inner(param, loaded, shard_id)

    inner = get_weight_loader(layer.weight)
    set_weight_loader(layer.weight, load)
    if layer.bias is not None:
        set_weight_loader(layer.bias, load)


class SelfAttentionV1(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary2D) -> None:
        super().__init__()
        d, heads = cfg.head_dim, cfg.num_attention_heads
        q = cfg.quantization  # rows are quantized one by one: the regrouping commutes with it
        self.query_key_value = QKVParallelLinear(cfg.hidden_size, d, heads, heads, bias=True,
                                                 quantization=q)
        _per_head_qkv_loader(self.query_key_value, heads, d)
        self.dense = RowParallelLinear(heads * d, cfg.hidden_size, bias=True, quantization=q)
        self.q_size = self.query_key_value.q_size
        self.rotary = rotary  # shared by all layers
        n = self.query_key_value.num_heads
        self.attn = Attention(n, n, d, d**-0.5)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        qkv = self.query_key_value(x)  # [T, 3 * H * D] for this rank's heads
        q, k, v = qkv.split([self.q_size] * 3, dim=-1)
        q, k = self.rotary(positions, q, k)
        out = self.dense(self.attn(q, k, v))
        assert isinstance(out, torch.Tensor)  # reduces its own results (it has a bias)
        return out


class MLPV1(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.dense_h_to_4h = MergedColumnParallelLinear(h, [i], bias=True,
                                                        quantization=cfg.quantization)
        self.dense_4h_to_h = RowParallelLinear(i, h, bias=True, quantization=cfg.quantization)
        self.act = GeluTanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))
        assert isinstance(out, torch.Tensor)
        return out


class GLMBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary2D) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.alpha = math.sqrt(2 * cfg.num_hidden_layers)
        self.input_layernorm = LayerNorm(h, eps)
        self.attention = SelfAttentionV1(cfg, rotary)
        self.post_attention_layernorm = LayerNorm(h, eps)
        self.mlp = MLPV1(cfg)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = self.input_layernorm(x)
        h = a * self.alpha + self.attention(positions, a)
        b = self.post_attention_layernorm(h)
        return b * self.alpha + self.mlp(b)


class ChatGLMv1Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        # block position ids reach max_model_len - context + 1; position ids stay below it
        rotary = Rotary2D(cfg.head_dim, cfg.max_model_len + 1, cfg.rope_theta)
        self.layers = nn.ModuleList(GLMBlock(cfg, rotary) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.word_embeddings(input_ids)  # [T, hidden]
        for layer in self.layers:
            x = layer(positions, x)
        return self.final_layernorm(x)


class ChatGLMv1ForCausalLM(nn.Module):
    """forward(input_ids [T], positions [T, 2]) -> hidden [T, hidden]; compute_logits(hidden
    [N, hidden]) -> [N, vocab] float32. Attention reads the batch layout (and each sequence's
    bidirectional prefix) from `forward_context`."""

    position_dims = 2  # the runner passes positions as [T, 2]: (position id, block position id)

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if not cfg.position_encoding_2d:
            raise ValueError(f"{cfg.model}: not a ChatGLM-6B v1 config (position_encoding_2d)")
        self.config = cfg
        self.fuses_reduce = False  # every row-parallel linear has a bias to add after its reduce
        self.transformer = ChatGLMv1Transformer(cfg)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, lm_head_quantization(cfg))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
