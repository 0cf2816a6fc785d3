"""Declarative maps from checkpoint tensor names to our parameter names.

A rule maps a checkpoint module path to one of our module paths (`*` stands for one layer
index and carries over), optionally with the shard id under which the tensor fills a fused
parameter. Rules match whole dotted names, `<module>.weight` / `.bias` / `.weight_scale` /
`.weight_zero_point` (the scales and zero points of a pre-quantized weight), anchored at both
ends, so `mlp.up_proj` can never match inside `mlp.gate_up_proj`. A name no rule matches maps to
itself; a fused checkpoint tensor under our own name (GLM's `gate_up_proj`) is then loaded with
shard id None and split by the parameter's weight_loader.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from flatout.layers.linear import ShardId


@dataclass(frozen=True)
class WeightRule:
    checkpoint: str  # dotted module path in the checkpoint; "*" = one layer index
    param: str  # our dotted module path; "*" receives the same index
    shard_id: ShardId | None = None


@dataclass(frozen=True)
class Target:
    param: str  # full parameter name, e.g. "model.layers.3.self_attn.qkv_proj.weight"
    shard_id: ShardId | None


# the tensors of one module a rule maps
_TENSORS = "weight|bias|weight_scale|weight_zero_point"


def _module_pattern(path: str) -> str:
    return re.escape(path).replace(r"\*", r"(\d+)")


class WeightNameMap:
    def __init__(self, rules: list[WeightRule], droppable: list[str]) -> None:
        self.rules = list(rules)
        self._rules = [
            (re.compile(rf"^{_module_pattern(r.checkpoint)}\.({_TENSORS})$"), r) for r in rules
        ]
        # whole names of tensors that hold nothing we need (e.g. rotary inv_freq buffers)
        self._droppable = [re.compile(rf"^{_module_pattern(d)}$") for d in droppable]

    def resolve(self, name: str) -> Target | None:
        """The parameter (and shard) a checkpoint tensor loads into; None: drop it."""
        if any(p.match(name) for p in self._droppable):
            return None
        for pattern, rule in self._rules:
            m = pattern.match(name)
            if m is None:
                continue
            param = rule.param
            if "*" in param:
                param = param.replace("*", m.group(1))
            # the last group is the tensor's (weight|bias|weight_scale|weight_zero_point)
            return Target(f"{param}.{m.group(pattern.groups)}", rule.shard_id)
        return Target(name, None)


_L = "model.layers.*"

# transformers' own layout (Llama, Qwen2, Qwen3, Glm, Glm4): only the split projections need
# rules; everything else already carries our names.
HF_WEIGHT_NAMES = WeightNameMap(
    rules=[
        WeightRule(f"{_L}.self_attn.q_proj", f"{_L}.self_attn.qkv_proj", "q"),
        WeightRule(f"{_L}.self_attn.k_proj", f"{_L}.self_attn.qkv_proj", "k"),
        WeightRule(f"{_L}.self_attn.v_proj", f"{_L}.self_attn.qkv_proj", "v"),
        WeightRule(f"{_L}.mlp.gate_proj", f"{_L}.mlp.gate_up_proj", 0),
        WeightRule(f"{_L}.mlp.up_proj", f"{_L}.mlp.gate_up_proj", 1),
    ],
    droppable=[f"{_L}.self_attn.rotary_emb.inv_freq"],
)

_C = "transformer.encoder.layers.*"

# remote-code ChatGLM2/3 and glm-4-9b-chat: query_key_value is q|k|v stacked and dense_h_to_4h
# is gate|up stacked; both load fused (shard id None) and are split by the weight loader.
CHATGLM_WEIGHT_NAMES = WeightNameMap(
    rules=[
        WeightRule("transformer.embedding.word_embeddings", "model.embed_tokens"),
        WeightRule(f"{_C}.input_layernorm", f"{_L}.input_layernorm"),
        WeightRule(f"{_C}.self_attention.query_key_value", f"{_L}.self_attn.qkv_proj"),
        WeightRule(f"{_C}.self_attention.dense", f"{_L}.self_attn.o_proj"),
        WeightRule(f"{_C}.post_attention_layernorm", f"{_L}.post_attention_layernorm"),
        WeightRule(f"{_C}.mlp.dense_h_to_4h", f"{_L}.mlp.gate_up_proj"),
        WeightRule(f"{_C}.mlp.dense_4h_to_h", f"{_L}.mlp.down_proj"),
        WeightRule("transformer.encoder.final_layernorm", "model.norm"),
        WeightRule("transformer.output_layer", "lm_head"),
    ],
    droppable=["transformer.rotary_pos_emb.inv_freq"],
)

_G = "transformer.vision.linear_proj"

# GLM-4V-9B: ChatGLM's text names; the tower's `transformer.vision.*` are our names, except the
# adapter's gate_proj / dense_h_to_4h, which fill the two halves of its fused gate_up_proj.
GLM4V_9B_WEIGHT_NAMES = WeightNameMap(
    rules=[
        *CHATGLM_WEIGHT_NAMES.rules,
        WeightRule(f"{_G}.gate_proj", f"{_G}.gate_up_proj", 0),
        WeightRule(f"{_G}.dense_h_to_4h", f"{_G}.gate_up_proj", 1),
    ],
    droppable=["transformer.rotary_pos_emb.inv_freq"],
)

_V = "model.language_model.layers.*"

# GLM-4.1V as shipped: model.visual.* and lm_head.* carry our names; the text decoder sits under
# model.language_model with split q/k/v and a fused gate_up_proj.
GLM4V_WEIGHT_NAMES = WeightNameMap(
    rules=[
        WeightRule(f"{_V}.self_attn.q_proj", f"{_V}.self_attn.qkv_proj", "q"),
        WeightRule(f"{_V}.self_attn.k_proj", f"{_V}.self_attn.qkv_proj", "k"),
        WeightRule(f"{_V}.self_attn.v_proj", f"{_V}.self_attn.qkv_proj", "v"),
    ],
    droppable=[],
)

# ChatGLM-6B v1 as shipped: the model's parameters carry the checkpoint's names
# (`transformer.layers.N.attention.query_key_value`, ...); only the rotary buffers are dropped.
CHATGLM_V1_WEIGHT_NAMES = WeightNameMap(
    rules=[],
    droppable=["transformer.layers.*.attention.rotary_emb.inv_freq"],
)
