"""Checkpoint loading: layouts, name mapping, clear errors, tensor-parallel sharding, dummy init."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from flatout.distributed import PendingReduce, init_tensor_parallel
from flatout.layers.embedding import VocabParallelEmbedding
from flatout.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from flatout.models.loader import CheckpointError
from flatout.models.registry import load_model, resolve_model_config
from flatout.models.weight_names import CHATGLM_WEIGHT_NAMES, HF_WEIGHT_NAMES, Target
from tests.helpers.logits import flatout_logits, hf_logits, max_abs_diff, random_prompts
from tests.helpers.tiny_checkpoints import load_hf_reference, make_tiny_checkpoint

CPU = torch.device("cpu")
LENS = [7, 2, 13]


def _assert_matches_reference(path: Path) -> None:
    cfg = resolve_model_config(str(path))
    prompts = random_prompts(cfg.vocab_size, LENS)
    ours = flatout_logits(load_model(cfg, CPU), prompts)
    assert max_abs_diff(ours, hf_logits(load_hf_reference(path), prompts)) < 1e-4


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> None:
    file = path / "model.safetensors"
    state = load_file(file)
    edit(state)
    save_file(state, file, metadata={"format": "pt"})


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "ChatGLMModel", "GlmForCausalLM"])
def test_sharded_checkpoint_with_index(arch: str, tmp_path: Path) -> None:
    path = make_tiny_checkpoint(arch, tmp_path / "ckpt", sharded=True)
    assert (path / "model.safetensors.index.json").is_file()
    assert len(list(path.glob("*.safetensors"))) > 1
    _assert_matches_reference(path)


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("GlmForCausalLM", {}),  # partial_rotary_factor absent: GLM default 0.5
        ("Glm4ForCausalLM", dict(partial_rotary_factor=0.25)),
        ("LlamaForCausalLM", dict(rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8})),
        ("Qwen2ForCausalLM", dict(rope_theta=12345.0)),
    ],
)
def test_old_and_new_config_layouts_agree(arch: str, overrides: dict, tmp_path: Path) -> None:
    new = make_tiny_checkpoint(arch, tmp_path / "new", **overrides)
    old = make_tiny_checkpoint(arch, tmp_path / "old", old_config_layout=True, **overrides)
    raw_old = json.loads((old / "config.json").read_text())
    assert "rope_parameters" not in raw_old and "rope_theta" in raw_old
    cfg_new, cfg_old = resolve_model_config(str(new)), resolve_model_config(str(old))
    differing = {
        f.name for f in dataclasses.fields(cfg_new)
        if getattr(cfg_new, f.name) != getattr(cfg_old, f.name)
    }
    assert differing <= {"model", "hf_config"}
    _assert_matches_reference(old)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt")
    _edit_tensors(path, lambda s: s.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        load_model(resolve_model_config(str(path)), CPU)


def test_missing_lm_head_is_named(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("Qwen2ForCausalLM", tmp_path / "ckpt")
    _edit_tensors(path, lambda s: s.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"lacks tensors for: lm_head\.weight"):
        load_model(resolve_model_config(str(path)), CPU)


def test_unexpected_tensor_is_named(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("GlmForCausalLM", tmp_path / "ckpt")
    _edit_tensors(path, lambda s: s.update({"model.layers.0.mlp.extra.weight": torch.ones(2)}))
    with pytest.raises(CheckpointError, match=r"does not use: model\.layers\.0\.mlp\.extra"):
        load_model(resolve_model_config(str(path)), CPU)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("Qwen3ForCausalLM", tmp_path / "ckpt")
    name = "model.layers.0.mlp.down_proj.weight"
    _edit_tensors(path, lambda s: s.update({name: s[name][:, :-1].contiguous()}))
    with pytest.raises(CheckpointError, match=rf"{name}.*columns"):
        load_model(resolve_model_config(str(path)), CPU)


def test_checkpoint_without_model_prefix_and_with_droppable_tensors(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt", tie_word_embeddings=True)

    def edit(state: dict[str, torch.Tensor]) -> None:
        for name in list(state):
            if name.startswith("model."):
                state[name[len("model."):]] = state.pop(name)
        state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old HF buffer
        state["lm_head.weight"] = state["embed_tokens.weight"].clone()  # tied copy: redundant

    _edit_tensors(path, edit)
    _assert_matches_reference(path)


def test_folder_without_safetensors(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "ckpt")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        load_model(resolve_model_config(str(path)), CPU)


def test_names_match_whole_dotted_names() -> None:
    hf = HF_WEIGHT_NAMES.resolve
    assert hf("model.layers.3.mlp.up_proj.weight") == Target(
        "model.layers.3.mlp.gate_up_proj.weight", 1)
    # a fused checkpoint tensor keeps its name and loads whole: not mistaken for up_proj
    assert hf("model.layers.3.mlp.gate_up_proj.weight") == Target(
        "model.layers.3.mlp.gate_up_proj.weight", None)
    assert hf("model.layers.12.self_attn.v_proj.bias") == Target(
        "model.layers.12.self_attn.qkv_proj.bias", "v")
    assert hf("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    # a pre-quantized weight's scales and (4-bit) zero points follow the weight into its shard
    assert hf("model.layers.0.self_attn.q_proj.weight_scale") == Target(
        "model.layers.0.self_attn.qkv_proj.weight_scale", "q")
    assert hf("model.layers.0.self_attn.q_proj.weight_zero_point") == Target(
        "model.layers.0.self_attn.qkv_proj.weight_zero_point", "q")
    assert hf("model.layers.0.self_attn.q_proj.input_zero_point") == Target(
        "model.layers.0.self_attn.q_proj.input_zero_point", None)  # not a rule match: unexpected
    cg = CHATGLM_WEIGHT_NAMES.resolve
    assert cg("transformer.encoder.layers.10.self_attention.query_key_value.bias") == Target(
        "model.layers.10.self_attn.qkv_proj.bias", None)
    assert cg("transformer.output_layer.weight") == Target("lm_head.weight", None)
    assert cg("transformer.rotary_pos_emb.inv_freq") is None


@pytest.fixture
def tensor_parallel() -> Iterator[Callable[[int, int], None]]:
    """Build layers as rank r of a group of n (weight loading only: no collectives run)."""
    yield init_tensor_parallel
    init_tensor_parallel(0, 1)


@pytest.mark.parametrize("tp", [2, 4])
def test_qkv_sharding_splits_fused_tensor_by_heads(
    tensor_parallel: Callable[[int, int], None], tp: int
) -> None:
    hidden, d, heads, kv_heads = 8, 4, 4, 2
    q, k, v = (torch.randn(n * d, hidden) for n in (heads, kv_heads, kv_heads))
    for rank in range(tp):
        tensor_parallel(rank, tp)
        fused = QKVParallelLinear(hidden, d, heads, kv_heads, bias=False)
        fused.weight_loader(fused.weight, torch.cat([q, k, v]))  # one q|k|v tensor
        split = QKVParallelLinear(hidden, d, heads, kv_heads, bias=False)
        for sid, t in zip("qkv", (q, k, v), strict=True):
            split.weight_loader(split.weight, t, sid)
        hq = heads // tp
        kv_rank = rank * kv_heads // tp  # with tp > kv heads, ranks share (replicate) a kv head
        hkv = max(1, kv_heads // tp)
        expected = torch.cat([
            q[rank * hq * d:(rank + 1) * hq * d],
            k[kv_rank * hkv * d:(kv_rank + 1) * hkv * d],
            v[kv_rank * hkv * d:(kv_rank + 1) * hkv * d],
        ])
        assert torch.equal(fused.weight, expected) and torch.equal(split.weight, expected)


def test_column_and_row_shards_recompose_the_full_layer(
    tensor_parallel: Callable[[int, int], None],
) -> None:
    hidden, inter, tp = 6, 10, 2
    gate, up = torch.randn(inter, hidden), torch.randn(inter, hidden)
    down = torch.randn(hidden, inter)
    bias = torch.randn(hidden)
    x = torch.randn(3, hidden)
    full = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T + bias
    partial_sum = torch.zeros_like(full)
    for rank in range(tp):
        tensor_parallel(rank, tp)
        gate_up = MergedColumnParallelLinear(hidden, [inter, inter])
        gate_up.weight_loader(gate_up.weight, torch.cat([gate, up]))  # fused gate|up
        row = RowParallelLinear(inter, hidden, bias=True)
        row.weight_loader(row.weight, down)
        row.weight_loader(row.bias, bias)
        g, u = gate_up(x).chunk(2, dim=-1)  # this rank's halves of gate and of up
        partial_sum += torch.nn.functional.linear(torch.nn.functional.silu(g) * u, row.weight)
    torch.testing.assert_close(partial_sum + bias, full)


def test_vocab_shards_pad_the_last_rank(
    tensor_parallel: Callable[[int, int], None],
) -> None:
    vocab, dim, tp = 301, 4, 2
    table = torch.randn(vocab, dim)
    rows = []
    for rank in range(tp):
        tensor_parallel(rank, tp)
        emb = VocabParallelEmbedding(vocab, dim)
        emb.weight.fill_(7.0)
        emb.weight_loader(emb.weight, table)
        assert emb.weight.shape == (151, dim)
        rows.append(emb.weight)
    assert torch.equal(torch.cat(rows)[:vocab], table)
    assert torch.equal(rows[1][-1], torch.zeros(dim))  # padding row


def test_dummy_load_of_a_scaled_down_preset() -> None:
    cfg = resolve_model_config("glm-4-9b-0414")
    assert cfg.load_format == "dummy"
    small = dataclasses.replace(
        cfg, num_hidden_layers=2, hidden_size=256, intermediate_size=512, vocab_size=1000,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, rotary_dim=32,
        max_model_len=128,
    )
    model = load_model(small, CPU)
    assert sum(p.numel() for p in model.parameters()) == small.num_params
    assert torch.equal(model.model.norm.weight, torch.ones(256))
    emb = model.model.embed_tokens.weight
    assert 0 < emb.abs().max() <= 1e-3
    logits = flatout_logits(model, random_prompts(1000, [6, 3]))
    assert all(torch.isfinite(lg).all() for lg in logits)
    assert logits[0].shape == (6, 1000)


def test_row_parallel_partial_output_is_reduced_by_the_next_norm(
    tensor_parallel: Callable[[int, int], None],
) -> None:
    """reduce_results=False returns this rank's partial sum as a PendingReduce (no symmetric
    buffers on the CPU: an ordinary tensor); the norm given a PendingReduce reduces it before the
    add + norm, so summing the ranks' partials and normalising gives the full layer's result."""
    from flatout.layers.norm import RMSNorm

    hidden, inter, tp = 6, 10, 2
    down, x, residual = torch.randn(hidden, inter), torch.randn(3, inter), torch.randn(3, hidden)
    norm = RMSNorm(hidden, 1e-6)
    partials = []
    for rank in range(tp):
        tensor_parallel(rank, tp)
        row = RowParallelLinear(inter, hidden, reduce_results=False)
        row.weight_loader(row.weight, down)
        pending = row(x[:, rank * inter // tp:(rank + 1) * inter // tp])
        assert isinstance(pending, PendingReduce) and pending.symmetric is None
        partials.append(pending.partial)
        with pytest.raises(ValueError, match="bias"):
            RowParallelLinear(inter, hidden, bias=True, reduce_results=False)
    tensor_parallel(0, 1)  # a group of one: the norm's all-reduce is the identity
    got, got_sum = norm.forward_with_residual(PendingReduce(partials[0] + partials[1]), residual)
    torch.testing.assert_close(got_sum, x @ down.T + residual)
    torch.testing.assert_close(got, norm(x @ down.T + residual))
