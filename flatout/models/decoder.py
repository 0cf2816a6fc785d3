"""The one decoder-only transformer behind every supported architecture.

GLM, GLM-4-0414, ChatGLM (v2/v3/glm-4-9b-chat), Llama, Qwen2 and Qwen3 differ only in flags of
`ModelConfig` (qkv/o bias, Qwen3 per-head q/k norm, GLM-4-0414 sandwich norms, rotary pairing and
partial rotary dim, tied embeddings) and in checkpoint weight names, which `weight_names.py` maps
onto the parameter names here (HF-style: `model.layers.N.self_attn.qkv_proj.weight`, ...).

Layers pass the residual stream alongside the hidden states so each norm can fuse the add:
    h, r = norm(h + r)  ==  r = h + r; h = norm(r)
Where `fuses_reduce(cfg)` (decided once, in CausalLM) the o/down projections return a
`PendingReduce` and that norm also does their all-reduce.
"""

from __future__ import annotations

import torch
from torch import nn

from flatout.config import ModelConfig
from flatout.distributed import PendingReduce
from flatout.layers.activation import SiluAndMul
from flatout.layers.attention import Attention
from flatout.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from flatout.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from flatout.layers.norm import RMSNorm
from flatout.layers.rotary import MRotaryEmbedding, PerTokenRope, RotaryEmbedding


def fuses_reduce(cfg: ModelConfig) -> bool:
    """Whether the o/down projections leave their all-reduce to the next norm (one kernel for
    reduce + add + norm): not with a bias to add after the reduce or a sandwich norm before
    the add."""
    return not cfg.o_proj_bias and not cfg.sandwich_norm


def lm_head_quantization(cfg: ModelConfig) -> str | None:
    """The LM head's weight format: the model's quantization only with quantize_lm_head (a
    tied head is the embedding table, which stays in the model dtype)."""
    if not cfg.quantize_lm_head:
        return None
    if cfg.tie_word_embeddings:
        raise ValueError("quantize_lm_head: the LM head is tied to the embedding table")
    return cfg.quantization


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding, defer_reduce: bool) -> None:
        super().__init__()
        d = cfg.head_dim
        self.head_dim = d
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, d, cfg.num_attention_heads, cfg.num_key_value_heads,
            bias=cfg.attention_bias, quantization=cfg.quantization,
        )
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * d, cfg.hidden_size, bias=cfg.o_proj_bias,
            reduce_results=not defer_reduce, quantization=cfg.quantization,
        )
        self.q_size, self.kv_size = self.qkv_proj.q_size, self.qkv_proj.kv_size
        # Qwen3: RMSNorm over each head of q and k, before the rotation
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.rotary_emb = rotary_emb  # shared by all layers
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, d, d**-0.5)

    def forward(
        self, positions: torch.Tensor | PerTokenRope, x: torch.Tensor
    ) -> torch.Tensor | PendingReduce:
        t = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, (H + 2 KVH) * D] for this rank's heads
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.q_norm is not None and self.k_norm is not None:
            q = self.q_norm(q.view(t, -1, self.head_dim)).view(t, -1)
            k = self.k_norm(k.view(t, -1, self.head_dim)).view(t, -1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v))  # attn: [T, H*D] -> [T, hidden]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, defer_reduce: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, bias=False,
            quantization=cfg.quantization,
        )
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, bias=False,
                                           reduce_results=not defer_reduce,
                                           quantization=cfg.quantization)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor | PendingReduce:  # [T, hidden]
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    """Returns the MLP's output, a `PendingReduce` when the layer defers its reduces, and the
    residual stream."""

    def __init__(self, cfg: ModelConfig, rotary_emb: RotaryEmbedding, defer_reduce: bool) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.self_attn = SelfAttention(cfg, rotary_emb, defer_reduce)
        self.mlp = MLP(cfg, defer_reduce)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps)  # despite the name: the pre-MLP norm
        # GLM-4-0414 "sandwich": extra norms on the attention and MLP outputs, before the add
        self.post_self_attn_layernorm = RMSNorm(h, eps) if cfg.sandwich_norm else None
        self.post_mlp_layernorm = RMSNorm(h, eps) if cfg.sandwich_norm else None

    def forward(
        self,
        positions: torch.Tensor | PerTokenRope,
        hidden: torch.Tensor | PendingReduce,
        residual: torch.Tensor | None,
    ) -> tuple[torch.Tensor | PendingReduce, torch.Tensor]:
        if residual is None:
            assert isinstance(hidden, torch.Tensor), "the first layer takes the embeddings"
            residual = hidden
            x = self.input_layernorm(hidden)
        else:
            x, residual = self.input_layernorm.forward_with_residual(hidden, residual)
        out = self.self_attn(positions, x)
        if self.post_self_attn_layernorm is not None:  # never deferred: see fuses_reduce
            out = self.post_self_attn_layernorm(out)
        x, residual = self.post_attention_layernorm.forward_with_residual(out, residual)
        out = self.mlp(x)
        if self.post_mlp_layernorm is not None:
            out = self.post_mlp_layernorm(out)
        return out, residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, defer_reduce: bool) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        rotary_emb: RotaryEmbedding
        if cfg.mrope_section is not None:  # GLM-4.1V: positions are [3, T]
            # image positions run below text ones, so the text length bounds every position
            rotary_emb = MRotaryEmbedding(
                cfg.head_dim, cfg.rotary_dim, cfg.max_model_len, cfg.rope_theta,
                cfg.mrope_section,
            )
        else:
            rotary_emb = RotaryEmbedding(
                cfg.head_dim, cfg.rotary_dim, cfg.max_model_len, cfg.rope_theta,
                interleaved=cfg.rope_interleaved, rope_scaling=cfg.rope_scaling,
            )
        self.rotary_emb = rotary_emb  # shared by every layer
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, rotary_emb, defer_reduce) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """inputs_embeds: [T, hidden] used instead of embedding input_ids (vision models)."""
        embeddings: torch.Tensor = (
            self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        )  # [T, hidden]
        hidden: torch.Tensor | PendingReduce = embeddings
        residual = None
        rope = self.rotary_emb.prepare(positions)  # M-RoPE: per-token cos|sin, once
        for layer in self.layers:
            hidden, residual = layer(rope, hidden, residual)
        if residual is None:  # no layers
            return self.norm(embeddings)
        return self.norm.forward_with_residual(hidden, residual)[0]


class CausalLM(nn.Module):
    """A decoder with an LM head: the model interface the runner uses.

    forward(input_ids [T], positions [T]) -> hidden [T, hidden_size] over a flattened batch;
    attention reads the batch layout from `forward_context`. compute_logits(hidden [N, hidden])
    -> logits [N, vocab_size] in float32."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.fuses_reduce = fuses_reduce(cfg)  # the runner sets up the fused reduce for it
        self.model = DecoderModel(cfg, self.fuses_reduce)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, lm_head_quantization(cfg))
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
