"""GLM-4 remote-code tokenizers (tiktoken rank file): ids equal tiktoken's."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tiktoken
from transformers import PreTrainedTokenizerFast

from flatout.tokenizers import GLM4_PATTERN, GLM4_SPECIAL_TOKENS, load_tokenizer, stop_token_ids
from flatout.tokenizers.templates import GLM4_CHAT_TEMPLATE
from flatout.tokenizers.tiktoken_bpe import (
    build_tiktoken_tokenizer,
    looks_like_tiktoken_file,
    read_tiktoken_ranks,
)
from tests.tokenizers.tokenizer_fixtures import SAMPLE_TEXTS, handmade_ranks, write_tiktoken_file

# Characters drawn at random to build adversarial strings: letters, CJK, emoji, digits, spaces,
# newlines, apostrophes (the pattern's contractions), punctuation.
_ALPHABET = list("abcdefgh ABC  \n\t\r0123456789'sStTdDmM大语言模型你好😀🎉éß.,!?-_()\u00a0") + [
    "  ",
    "\n\n",
    "'ll",
    "'VE",
    "\r\n",
]


def glm4_checkpoint(folder: Path, ranks: dict[bytes, int], **config: object) -> Path:
    """A glm-4-9b-chat-shaped tokenizer folder: tokenizer.model + remote-code tokenizer_config."""
    folder.mkdir(parents=True, exist_ok=True)
    write_tiktoken_file(folder / "tokenizer.model", ranks)
    tokenizer_config = {
        "tokenizer_class": "ChatGLM4Tokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        **config,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def oracle(ranks: dict[bytes, int]) -> tiktoken.Encoding:
    specials = {content: len(ranks) + i for i, content in enumerate(GLM4_SPECIAL_TOKENS)}
    return tiktoken.Encoding(
        "glm4-test", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )


def random_texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 48))) for _ in range(count)]


@pytest.mark.parametrize("ranks_kind", ["trained", "handmade"])
def test_encode_equals_tiktoken(ranks_kind: str, glm4_ranks: dict[bytes, int]) -> None:
    ranks = glm4_ranks if ranks_kind == "trained" else handmade_ranks()
    specials = {content: len(ranks) + i for i, content in enumerate(GLM4_SPECIAL_TOKENS)}
    ours = build_tiktoken_tokenizer(ranks, GLM4_PATTERN, specials)
    expected = oracle(ranks)
    for text in SAMPLE_TEXTS + random_texts(1500):
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == expected.encode(text, disallowed_special=()), repr(text)
        assert ours.decode(ids) == text


def test_loaded_glm4_tokenizer(tmp_path: Path, glm4_ranks: dict[bytes, int]) -> None:
    # Special tokens a config names but the vocabulary lacks are ignored, never appended.
    folder = glm4_checkpoint(tmp_path / "glm4", glm4_ranks, unk_token="<unk>", bos_token="<s>")
    tok = load_tokenizer(str(folder))
    assert isinstance(tok, PreTrainedTokenizerFast)
    n = len(glm4_ranks)
    assert len(tok) == n + 14 and tok.unk_token is None
    # Specials follow the base ranks in glm-4-9b-chat's order (there: 151329, 151336, 151338).
    assert tok.convert_tokens_to_ids(list(GLM4_SPECIAL_TOKENS)) == list(range(n, n + 14))
    assert tok.eos_token_id == n and tok.pad_token_id == n
    assert set(range(n, n + 14)) <= set(tok.all_special_ids)
    expected = oracle(glm4_ranks)
    text = SAMPLE_TEXTS[2] + SAMPLE_TEXTS[3]
    body = expected.encode(text)
    # add_special_tokens=True prepends [gMASK]<sop>, as the original tokenizer does.
    assert tok.encode(text) == [n + 2, n + 4, *body]
    assert tok.encode(text, add_special_tokens=False) == body
    # Special-token text inside the input is recognised (chat templates rely on it).
    assert tok.encode("<|user|>\nhi", add_special_tokens=False) == [n + 7, *expected.encode("\nhi")]
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text
    assert tok.decode([n + 2, n + 4]) == "[gMASK]<sop>"
    assert tok.convert_ids_to_tokens(n + 8) == "<|assistant|>"


def test_partial_utf8_decodes_to_replacement_char(glm4_ranks: dict[bytes, int]) -> None:
    specials = {"<|endoftext|>": len(glm4_ranks)}
    tok = build_tiktoken_tokenizer(glm4_ranks, GLM4_PATTERN, specials)
    ids = tok.encode("🎉", add_special_tokens=False).ids
    assert len(ids) > 1, "the test needs a character split over several tokens"
    assert tok.decode(ids[:1]).endswith("\ufffd")
    assert tok.decode(ids) == "🎉"


def test_builtin_and_checkpoint_templates(tmp_path: Path, glm4_ranks: dict[bytes, int]) -> None:
    messages = [
        {"role": "system", "content": "SYS"},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "你好"},
    ]
    tok = load_tokenizer(glm4_checkpoint(tmp_path / "none", glm4_ranks))
    assert tok.chat_template == GLM4_CHAT_TEMPLATE
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = (
        "[gMASK]<sop><|system|>\nSYS<|user|>\nHello<|assistant|>\nHi there<|user|>\n你好"
        "<|assistant|>"
    )
    assert rendered == expected
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    n = len(glm4_ranks)
    assert ids[:3] == [n + 2, n + 4, n + 6] and ids[-1] == n + 8

    own = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    folder = glm4_checkpoint(tmp_path / "own", glm4_ranks, chat_template=own)
    assert (
        load_tokenizer(folder).apply_chat_template(messages[1:2], tokenize=False) == "<|user|>Hello"
    )
    (folder / "chat_template.jinja").write_text("from file")
    assert load_tokenizer(folder).apply_chat_template(messages[1:2], tokenize=False) == "from file"


def test_stop_tokens_include_glm_turn_tokens(tmp_path: Path, glm4_ranks: dict[bytes, int]) -> None:
    folder = glm4_checkpoint(tmp_path / "glm4", glm4_ranks)
    n = len(glm4_ranks)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": n}))
    assert stop_token_ids(load_tokenizer(folder), folder) == [n, n + 7, n + 9]


def test_added_tokens_decoder_adds_specials(tmp_path: Path, glm4_ranks: dict[bytes, int]) -> None:
    n = len(glm4_ranks)
    extra = {str(n + 16): {"content": "<|extra|>", "special": True}}
    tok = load_tokenizer(glm4_checkpoint(tmp_path / "g", glm4_ranks, added_tokens_decoder=extra))
    assert tok.convert_tokens_to_ids("<|extra|>") == n + 16
    assert tok.encode("<|extra|>", add_special_tokens=False) == [n + 16]
    assert len(tok) == n + 17  # id n + 14 and n + 15 are reserved placeholders


def test_rank_file_validation(tmp_path: Path) -> None:
    good = tmp_path / "good.model"
    write_tiktoken_file(good, handmade_ranks())
    assert looks_like_tiktoken_file(good)
    assert read_tiktoken_ranks(good) == handmade_ranks()
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"IQ== 0\nnot-base64! 1\n")
    with pytest.raises(ValueError, match="bad.model:2"):
        read_tiktoken_ranks(bad)
    gap = tmp_path / "gap.model"
    gap.write_bytes(b"IQ== 0\nIg== 2\n")
    with pytest.raises(ValueError, match="0..1"):
        read_tiktoken_ranks(gap)
    proto = tmp_path / "sp.model"
    proto.write_bytes(b"\n\x0b\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")
    assert not looks_like_tiktoken_file(proto)


def test_special_ids_must_follow_base_vocab(glm4_ranks: dict[bytes, int]) -> None:
    with pytest.raises(ValueError, match="without holes"):
        build_tiktoken_tokenizer(glm4_ranks, GLM4_PATTERN, {"<|x|>": len(glm4_ranks) + 1})
