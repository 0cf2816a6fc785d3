"""ChatGLM-6B v1 (`ice_text.model`): encode/decode equal sentencepiece plus the original's
documented normalisation (newlines, tabs, runs of spaces), on a few hundred strings."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import sentencepiece as spm

from flatout.tokenizers import load_tokenizer, stop_token_ids
from flatout.tokenizers.chatglm_v1 import CHATGLM_V1_SPECIAL_TOKENS, ChatGLMv1Tokenizer
from tests.models.chatglm_v1_reference import train_ice_text
from tests.tokenizers.tokenizer_fixtures import SAMPLE_TEXTS, SPM_CORPUS


@pytest.fixture(scope="module")
def ice_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_ice_text(tmp_path_factory.mktemp("ice") / "ice_text.model")


def v1_folder(folder: Path, model: Path, **config: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ice_text.model").write_bytes(model.read_bytes())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "bos_token": "<sop>", "eos_token": "<eop>", "gmask_token": "[gMASK]",
        "remove_space": False, "do_lower_case": False, **config,
    }))
    return folder


def original_normalize(text: str) -> str:
    """As the original documents it: newlines, then tabs, then runs of 80 down to 2 spaces."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for i in range(80, 1, -1):
        text = text.replace(" " * i, f"<|blank_{i}|>")
    return text


def original_denormalize(text: str) -> str:
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
    for i in range(2, 81):
        text = text.replace(f"<|blank_{i}|>", " " * i)
    return text


def _strings() -> list[str]:
    rng = random.Random(0)
    atoms = ["hello", "world", "大语言", "模型", "推理", "，", "。", "问", "答", "x", "42", "😀",
             "é", "\n", "\n\n", "\t", "\t\t", " ", "  ", " " * 5, " " * 79, " " * 80, " " * 81,
             " " * 163, "[gMASK]", "<sop>", "<eop>", "[MASK]"]
    out = SAMPLE_TEXTS + SPM_CORPUS
    for _ in range(300):
        out.append("".join(rng.choice(atoms) for _ in range(rng.randint(1, 12))))
    return out


def _split_specials(text: str) -> list[str]:
    import re

    pattern = "(" + "|".join(re.escape(t) for t in CHATGLM_V1_SPECIAL_TOKENS) + ")"
    return re.split(pattern, text)


@pytest.mark.parametrize("num_image_tokens", [0, 20])
def test_encode_decode_equal_the_original(tmp_path: Path, ice_text: Path,
                                          num_image_tokens: int) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(ice_text))
    off = num_image_tokens
    tok = load_tokenizer(v1_folder(tmp_path / "chatglm-6b", ice_text,
                                   num_image_tokens=num_image_tokens))
    assert isinstance(tok, ChatGLMv1Tokenizer)
    gmask, sop = sp.piece_to_id("[gMASK]") + off, sp.piece_to_id("<sop>") + off
    strings = _strings()
    assert len(strings) > 300
    for text in strings:
        expected: list[int] = []
        for i, part in enumerate(_split_specials(text)):
            if i % 2:
                expected.append(sp.piece_to_id(part) + off)
            elif part:
                expected += [t + off for t in sp.encode(original_normalize(part))]
        assert tok.encode(text, add_special_tokens=False) == expected, repr(text)
        assert tok.encode(text) == expected + [gmask, sop]
        decoded = original_denormalize(sp.decode([t - off for t in expected]))
        assert tok.decode(expected) == decoded
        if not any(t in text for t in CHATGLM_V1_SPECIAL_TOKENS):
            # this model's normaliser keeps everything; a run after a special token gets a
            # word-boundary space, as in the original
            assert decoded == text, repr(text)
        specials = set(tok.all_special_ids)
        plain = original_denormalize(sp.decode([t - off for t in expected if t not in specials]))
        assert tok.decode(expected + [gmask, sop], skip_special_tokens=True) == plain
    assert tok.decode(list(range(off))) == ""  # image tokens render as nothing
    assert len(tok) == tok.vocab_size == sp.get_piece_size() + off


def test_special_tokens_eos_and_stops(tmp_path: Path, ice_text: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(ice_text))
    tok = load_tokenizer(v1_folder(tmp_path / "c", ice_text, num_image_tokens=0))
    assert tok.eos_token_id == sp.piece_to_id("<eop>")
    assert tok.bos_token_id == sp.piece_to_id("<sop>")
    assert tok.pad_token_id == sp.piece_to_id("<pad>") and tok.padding_side == "left"
    assert stop_token_ids(tok) == [sp.piece_to_id("<eop>")]
    # the class default (20000) applies when tokenizer_config.json does not say
    assert load_tokenizer(v1_folder(tmp_path / "d", ice_text)).num_image_tokens == 20000


def test_chat_template(tmp_path: Path, ice_text: Path) -> None:
    tok = load_tokenizer(v1_folder(tmp_path / "c", ice_text, num_image_tokens=0))
    one = tok.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                  add_generation_prompt=True)
    assert one == "你好[gMASK]<sop>"
    history = [{"role": "user", "content": "Q0"}, {"role": "assistant", "content": "A0"},
               {"role": "user", "content": "Q1"}]
    rendered = tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert rendered == "[Round 0]\n问：Q0\n答：A0\n[Round 1]\n问：Q1\n答：[gMASK]<sop>"
    with pytest.raises(Exception, match="roles user and assistant"):
        tok.apply_chat_template([{"role": "system", "content": "x"},
                                 {"role": "user", "content": "y"}], tokenize=False)


def test_bad_files_and_settings(tmp_path: Path, ice_text: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "ice_text.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(broken)
    with pytest.raises(ValueError, match="do_lower_case"):
        load_tokenizer(v1_folder(tmp_path / "lower", ice_text, do_lower_case=True))
