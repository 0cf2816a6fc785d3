"""ChatGLM2/3 remote-code tokenizers (SentencePiece): encode/decode equal sentencepiece's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm

from flatout.tokenizers import load_tokenizer, stop_token_ids
from flatout.tokenizers.chatglm_sp import ChatGLMSentencePieceTokenizer
from flatout.tokenizers.templates import CHATGLM2_CHAT_TEMPLATE, CHATGLM3_CHAT_TEMPLATE
from tests.tokenizers.tokenizer_fixtures import SAMPLE_TEXTS, SPM_CORPUS


def chatglm_checkpoint(folder: Path, spm_model: Path, name: str = "", **config: object) -> Path:
    """A chatglm2/3-shaped folder: tokenizer.model + remote-code tokenizer_config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(spm_model.read_bytes())
    tokenizer_config = {
        "name_or_path": name,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "padding_side": "left",
        "remove_space": False,
        **config,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def test_encode_decode_equal_sentencepiece(tmp_path: Path, spm_model: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = load_tokenizer(chatglm_checkpoint(tmp_path / "chatglm2-6b", spm_model))
    assert isinstance(tok, ChatGLMSentencePieceTokenizer)
    n = sp.get_piece_size()
    for text in SAMPLE_TEXTS + SPM_CORPUS + ["isopropyl sop eop", "x" * 50, "𝔘𝔫𝔦 ☃ 𐍈"]:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, repr(text)
        # add_special_tokens=True prepends [gMASK] sop.
        assert tok.encode(text) == [n + 1, n + 3, *ids]
        assert tok.decode(ids) == sp.decode(ids)
        assert tok.decode([n + 1, n + 3, *ids], skip_special_tokens=True) == sp.decode(ids)
        assert tok.convert_ids_to_tokens(ids) == [sp.id_to_piece(i) for i in ids]


def test_special_tokens_and_ids(tmp_path: Path, spm_model: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    n = sp.get_piece_size()
    v2 = load_tokenizer(chatglm_checkpoint(tmp_path / "chatglm2-6b", spm_model))
    specials = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
    assert v2.convert_tokens_to_ids(specials) == list(range(n, n + 5))
    assert len(v2) == n + 5 and v2.convert_tokens_to_ids("<|user|>") == sp.unk_id()
    v3 = load_tokenizer(chatglm_checkpoint(tmp_path / "chatglm3-6b", spm_model))
    roles = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
    assert v3.convert_tokens_to_ids(specials + roles) == list(range(n, n + 9))
    assert v3.eos_token_id == sp.eos_id() and v3.pad_token_id == sp.unk_id()
    assert v3.padding_side == "left"
    assert set(range(n, n + 9)) | {sp.eos_id()} <= set(v3.all_special_ids)
    # Role tokens are recognised anywhere; sop/eop only right after another special token.
    ids = v3.encode("<|user|>\nsop isopropyl[gMASK]sop", add_special_tokens=False)
    expected = [n + 6, *sp.encode("\nsop isopropyl"), n + 1, n + 3]
    assert ids == expected
    assert v3.decode(ids) == "<|user|>" + sp.decode(sp.encode("\nsop isopropyl")) + "[gMASK]sop"
    assert v3.encode("<|user|>", add_special_tokens=False, split_special_tokens=True) == sp.encode(
        "<|user|>"
    )
    assert stop_token_ids(v3) == [sp.eos_id(), n + 6, n + 8]
    assert stop_token_ids(v2) == [sp.eos_id()]
    with pytest.raises(ValueError, match="outside the vocabulary"):
        v2.decode([n + 5])


def test_partial_byte_fallback_decodes_to_replacement_char(tmp_path: Path, spm_model: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = load_tokenizer(chatglm_checkpoint(tmp_path / "c", spm_model))
    ids = sp.encode("🦜")  # not in the corpus: byte-fallback pieces
    assert [sp.id_to_piece(i) for i in ids][-4:] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x9C>"]
    assert tok.decode(ids[:-1]).endswith("\ufffd")
    assert tok.decode(ids) == sp.decode(ids)


def test_chatglm3_template_and_detection(tmp_path: Path, spm_model: Path) -> None:
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "Why?"},
    ]
    # Detected from the name, from the (text-only) remote code, or from a role-token template.
    by_name = load_tokenizer(chatglm_checkpoint(tmp_path / "x", spm_model, "THUDM/chatglm3-6b"))
    code_folder = chatglm_checkpoint(tmp_path / "y", spm_model)
    (code_folder / "tokenization_chatglm.py").write_text(
        'raise SystemExit("must not run")\nROLES = ["<|user|>", "<|observation|>"]\n'
    )
    by_code = load_tokenizer(code_folder)
    for tok in (by_name, by_code):
        assert tok.chat_template == CHATGLM3_CHAT_TEMPLATE
        rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert rendered == (
            "[gMASK]sop<|system|>\n SYS<|user|>\n 你好<|assistant|>\n Hi"
            "<|user|>\n Why?<|assistant|>"
        )
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    n = sp.get_piece_size()
    ids = by_name.apply_chat_template(messages[1:2], add_generation_prompt=True)["input_ids"]
    assert ids == [n + 1, n + 3, n + 6, *sp.encode("\n 你好"), n + 7]
    own = "{% for m in messages %}<|{{ m.role }}|>\n {{ m.content }}{% endfor %}"
    by_template = load_tokenizer(chatglm_checkpoint(tmp_path / "z", spm_model, chat_template=own))
    assert by_template.convert_tokens_to_ids("<|observation|>") == n + 8
    assert by_template.chat_template == own


def test_chatglm2_round_template(tmp_path: Path, spm_model: Path) -> None:
    tok = load_tokenizer(chatglm_checkpoint(tmp_path / "chatglm2-6b", spm_model))
    assert tok.chat_template == CHATGLM2_CHAT_TEMPLATE
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == "[gMASK]sop[Round 1]\n\n问：Q1\n\n答：A1\n\n[Round 2]\n\n问：Q2\n\n答："
    with pytest.raises(Exception, match="roles system, user and assistant"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_not_a_sentencepiece_model(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(folder)
