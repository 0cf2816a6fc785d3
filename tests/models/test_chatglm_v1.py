"""ChatGLM-6B v1 through the whole engine equals a dense reference of the checkpoint's model,
token for token: mixed lengths, a [MASK]-mode prompt, chunked prefill with a prompt longer than
the step budget, preemption, and prefix-cache hits that only a whole equal context may reuse."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatout import LLM, SamplingParams
from flatout.engine.batch import PrefixLayout
from flatout.models.registry import resolve_model_config
from tests.models.chatglm_v1_reference import (
    GMASK,
    MASK,
    SOP,
    DenseChatGLMv1,
    make_tiny_v1_checkpoint,
)

NEW_TOKENS = 10


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)

    def text(n: int) -> list[int]:
        return torch.randint(4, 130, (n,), generator=g).tolist()

    return [
        text(3) + [GMASK, SOP],
        text(60) + [GMASK, SOP],
        text(9) + [MASK] + text(6) + [SOP],  # [MASK] mode: the mask sits inside the context
        text(30) + [GMASK, SOP] + text(2),  # tokens after <sop> in the prompt are causal
    ]


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> tuple[Path, list[list[int]], list[list[int]]]:  # noqa: ANN001
    path = make_tiny_v1_checkpoint(tmp_path_factory.mktemp("chatglm6b"))
    ref = DenseChatGLMv1(path)
    prompts = _prompts()
    with torch.no_grad():
        expected = [ref.greedy(p, NEW_TOKENS) for p in prompts]
    return path, prompts, expected


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def test_config_is_parsed_as_v1(v1) -> None:  # noqa: ANN001
    cfg = resolve_model_config(str(v1[0]))
    assert cfg.position_encoding_2d and cfg.prefix_lm
    assert (cfg.bos_token_id, cfg.mask_token_ids, cfg.eos_token_ids) == (SOP, (GMASK, MASK), (145,))
    assert cfg.hidden_act == "gelu_tanh" and cfg.rotary_dim == cfg.head_dim // 2


def test_the_reference_depends_on_what_v1_adds(v1) -> None:  # noqa: ANN001
    """The oracle must see the bidirectional mask and the block positions, or equal outputs
    would not show that the engine implements them."""
    path, prompts, _ = v1
    ref = DenseChatGLMv1(path)
    ids = prompts[1] + [7, 8]
    full = ref.logits(ids)
    # a token late in the context changes the logits of an early context position
    changed = list(ids)
    changed[50] = (changed[50] + 1) % 130
    assert not torch.allclose(full[5], ref.logits(changed)[5])


def test_batch_of_mixed_lengths(v1) -> None:  # noqa: ANN001
    path, prompts, expected = v1
    llm = LLM(str(path), block_size=4, num_kv_blocks=256, enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    llm.engine.block_manager.check_integrity()
    assert llm.engine.block_manager.num_used_blocks == 0


def test_prompt_longer_than_the_step_budget_is_prefilled_whole(v1) -> None:  # noqa: ANN001
    path, prompts, expected = v1
    llm = LLM(str(path), block_size=4, num_kv_blocks=256, max_num_batched_tokens=9)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    # the contexts (4, 61, 16, 31 tokens) are never split, yet the tokens after <sop> of the
    # last prompt may be: more steps than prompts + decodes need with no budget at all
    assert llm.engine.stats.num_steps >= NEW_TOKENS + 1


def test_preemption(v1) -> None:  # noqa: ANN001
    path, prompts, expected = v1
    llm = LLM(str(path), block_size=4, num_kv_blocks=24, enable_prefix_caching=False)
    outs = llm.generate(prompts, GREEDY)
    assert [o.token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions > 0
    llm.engine.block_manager.check_integrity()


def test_prefix_cache_reuses_blocks_only_under_an_equal_context(v1) -> None:  # noqa: ANN001
    path, prompts, expected = v1
    llm = LLM(str(path), block_size=4, num_kv_blocks=256, enable_prefix_caching=True)
    first = llm.generate(prompts, GREEDY)
    computed_first = llm.engine.stats.num_prefill_tokens
    second = llm.generate(prompts, GREEDY)  # equal prompts: their blocks are reused
    assert [o.token_ids for o in first] == expected
    assert [o.token_ids for o in second] == expected
    assert llm.engine.stats.num_prefill_tokens - computed_first < computed_first / 2
    # the same 60 leading tokens under another context: their K/V differ, nothing is reused
    other = prompts[1][:60] + [9, 9, 9, GMASK, SOP]
    out = llm.generate([other], GREEDY)[0]
    assert out.num_cached_tokens == 0
    assert out.token_ids == DenseChatGLMv1(path).greedy(other, NEW_TOKENS)
    llm.engine.block_manager.check_integrity()


def test_prompt_without_its_marks_is_refused(v1) -> None:  # noqa: ANN001
    llm = LLM(str(v1[0]), block_size=4, num_kv_blocks=64)
    with pytest.raises(ValueError, match="<sop>"):
        llm.generate([[5, 6, GMASK]], GREEDY)
    with pytest.raises(ValueError, match="mask token"):
        llm.generate([[5, 6, SOP]], GREEDY)


def test_prefix_layout_positions() -> None:
    layout = PrefixLayout.of([5, 6, 7, GMASK, SOP], SOP, (GMASK, MASK))
    assert (layout.context_len, layout.mask_position) == (4, 3)
    assert layout.positions(2, 7) == [2, 0, 3, 0, 3, 1, 3, 2, 3, 3]
    masked = PrefixLayout.of([5, MASK, 7, SOP], SOP, (GMASK, MASK))
    assert (masked.context_len, masked.mask_position) == (3, 1)


def test_parameter_counts(v1) -> None:  # noqa: ANN001
    from safetensors.torch import load_file

    from flatout.models.chatglm_v1 import ChatGLMv1ForCausalLM
    from flatout.plan import rank_param_count

    cfg = resolve_model_config(str(v1[0]))
    stored = load_file(str(v1[0] / "model.safetensors"))
    count = sum(t.numel() for k, t in stored.items() if not k.endswith("inv_freq"))
    assert cfg.num_params == count == rank_param_count(cfg, 1)
    preset = resolve_model_config("chatglm-6b")
    with torch.device("meta"):
        model = ChatGLMv1ForCausalLM(preset)
    assert preset.num_params == sum(p.numel() for p in model.parameters()) == 6_707_929_088
    assert preset.kv_bytes_per_token == 2 * 28 * 4096 * 4  # float32 on CPU


def test_chat_through_the_engine_with_the_v1_tokenizer(tmp_path: Path) -> None:
    import json

    import sentencepiece as spm

    from flatout.tokenizers import load_tokenizer
    from tests.models.chatglm_v1_reference import train_ice_text

    model = train_ice_text(tmp_path / "ice_text.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ids = {t: sp.piece_to_id(t) for t in ("[MASK]", "[gMASK]", "<sop>", "<eop>", "<pad>")}
    path = make_tiny_v1_checkpoint(
        tmp_path / "chatglm-6b", vocab_size=sp.get_piece_size(), mask_token_id=ids["[MASK]"],
        gmask_token_id=ids["[gMASK]"], bos_token_id=ids["<sop>"], eos_token_id=ids["<eop>"],
        pad_token_id=ids["<pad>"],
    )
    (path / "ice_text.model").write_bytes(model.read_bytes())
    (path / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 0}))
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "hi"},
                {"role": "user", "content": "今天天气  怎么样？\n"}]
    tok = load_tokenizer(path)
    prompt = tok.encode(tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True),
                        add_special_tokens=False)
    assert prompt[-2:] == [ids["[gMASK]"], ids["<sop>"]]
    llm = LLM(str(path), block_size=4, num_kv_blocks=128)
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))[0]
    assert out.token_ids == DenseChatGLMv1(path).greedy(prompt, 8)
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)
    assert ids["<eop>"] in llm.engine.model_config.eos_token_ids


def test_tensor_parallel_equals_the_reference(v1) -> None:  # noqa: ANN001
    """TP 2 over gloo: qkv regrouped per rank's heads, biased row-parallel reduces, prefix
    metadata and 2-D positions sent to the other rank."""
    path, prompts, expected = v1
    llm = LLM(str(path), tensor_parallel_size=2, block_size=4, num_kv_blocks=128,
              max_num_batched_tokens=20)
    try:
        outs = llm.generate(prompts, GREEDY)
    finally:
        llm.engine.core.shutdown()
    assert [o.token_ids for o in outs] == expected


LINEARS = ("attention.query_key_value.weight", "attention.dense.weight",
           "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight")


@pytest.mark.parametrize("tp", [1, 2])
def test_int8_equals_the_reference_over_its_dequantized_weights(v1, tp: int) -> None:  # noqa: ANN001
    """--quantization int8 (quantized on load, rows regrouped first; over two gloo ranks too):
    the engine's greedy tokens equal the dense reference's with every decoder linear replaced
    by its per-row int8 round trip (the LM head stays full precision)."""
    from flatout.kernels import reference

    path, prompts, unquantized = v1
    ref = DenseChatGLMv1(path)
    for name, w in ref.sd.items():
        if name.endswith(LINEARS):
            q, scale = reference.quantize_int8(w.float())
            ref.sd[name] = q.float() * scale[:, None]
    with torch.no_grad():
        expected = [ref.greedy(p, NEW_TOKENS) for p in prompts]
    assert expected != unquantized  # the round trip changes the tokens: the check can fail
    llm = LLM(str(path), quantization="int8", tensor_parallel_size=tp, block_size=4,
              num_kv_blocks=256, max_num_batched_tokens=32)
    try:
        assert [o.token_ids for o in llm.generate(prompts, GREEDY)] == expected
    finally:
        llm.shutdown()


def test_pre_quantized_v1_checkpoints_are_refused(v1, tmp_path: Path) -> None:  # noqa: ANN001
    import json
    import shutil

    path = shutil.copytree(v1[0], tmp_path / "fp8")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="pre-quantized ChatGLM-6B v1"):
        resolve_model_config(str(path))
