"""Builders of tiny tokenizer files for the tests: tiktoken rank files, SentencePiece models."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import sentencepiece as spm
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

from flatout.tokenizers import GLM4_PATTERN
from flatout.tokenizers.tiktoken_bpe import BYTE_TO_CHAR

# Varied text: English, CJK, emoji (multi-codepoint too), digits, whitespace runs, contractions.
SAMPLE_TEXTS = [
    "",
    "Hello world",
    "The quick brown fox jumps over the lazy dog. It's 2024; we'll see 1234567 numbers!",
    "大语言模型的推理服务需要高效的批处理。你好，世界！",
    "混合 text 和中文 mixed，标点。",
    "emoji 😀😃 🎉 👨‍👩‍👧 ❤️ and flags 🇫🇷",
    "café naïve Ünïcödé façade Ångström",
    "    four leading spaces",
    "trailing spaces   ",
    "tabs\tand\t\ttabs\nnew\n\nlines\r\nwindows\r\n",
    "  multiple   spaces    between     words  ",
    "\n\n\n",
    "   ",
    "I'M SHOUTING, YOU'RE TOO, THEY'VE, WE'LL, HE'D, IT'S",
    "def f(x):\n    return x ** 2  # square\n",
    '{"key": [1, 2, 3], "nested": {"a": null}}',
    "3.14159 2,718 0x1F 1e-5 -42 +7 100%",
    "こんにちは、世界。안녕하세요. привет мир",
    "a\u00a0b\u2003c\u3000d",  # non-breaking, em and ideographic spaces
]

CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's a test; we'll see the results.",
    "Serving language models means batching requests and streaming tokens back to users.",
    "大语言模型的推理服务需要高效的批处理。你好，世界！今天天气很好，我们去公园散步吧。",
    "def forward(self, x):\n    return self.linear(x) + self.bias  # residual\n\n",
    "emoji 😀😃 🎉 café naïve   spaces     runs\t\ttabs\n\n\nnumbers 12345 678 9",
    "こんにちは世界。안녕하세요. привет мир. Ünïcödé façade Ångström.",
]


def trained_ranks(vocab_size: int = 700) -> dict[bytes, int]:
    """A consistent tiktoken rank table: the 256 bytes, then BPE merges learned on CORPUS."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer=trainer)
    char_to_byte = {char: byte for byte, char in enumerate(BYTE_TO_CHAR)}
    ranks = {bytes([byte]): byte for byte in range(256)}
    for merge in json.loads(tokenizer.to_str())["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token = bytes(char_to_byte[char] for char in left + right)
        ranks.setdefault(token, len(ranks))
    return ranks


def handmade_ranks() -> dict[bytes, int]:
    """The 256 bytes plus a few merges, each built from two earlier tokens."""
    ranks = {bytes([byte]): byte for byte in range(256)}
    merged = [b"th", b"the", b" the", b"in", b"ing", b" t", b"  ", b"    ", b"he", b"ll", b"ello"]
    merged += ["你".encode()[:2], "你".encode(), "好".encode()[:2], "好".encode(), "你好".encode()]
    merged += [b"12", b"123"]
    for token in merged:
        ranks[token] = len(ranks)
    return ranks


def write_tiktoken_file(path: Path, ranks: dict[bytes, int]) -> None:
    lines = (base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks.items())
    path.write_bytes(b"".join(lines))


SPM_CORPUS = [
    "Hello world, this is a small corpus for a SentencePiece model.",
    "The isopropyl alcohol is in the soprano's bag. Stop and sop up the water.",
    "你好，世界！这是一个测试。大语言模型的推理服务需要高效的批处理。",
    "  multiple   spaces\tand\ttabs\nnewlines and numbers 12345 67.89",
    "emoji 😀 and café naïve façade; questions? answers! [brackets] {braces}",
    "问：今天天气怎么样？答：今天是晴天。",
]


def train_spm_model(path: Path, vocab_size: int = 500) -> Path:
    """A BPE SentencePiece model with byte fallback, like ChatGLM2/3's tokenizer.model."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(SPM_CORPUS * 30),
        model_writer=proto,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
    )
    path.write_bytes(proto.getvalue())
    return path
