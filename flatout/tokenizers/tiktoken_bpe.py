"""Build a Hugging Face `tokenizers` byte-level BPE from a tiktoken rank file.

A tiktoken rank file (GLM-4's remote-code `tokenizer.model`) holds one line per token,
`base64(token_bytes) rank`. tiktoken encodes a regex piece by returning it whole when it is in
the vocabulary, and otherwise by repeatedly merging the adjacent pair whose concatenation has the
lowest rank. The equivalent `tokenizers` model is a BPE with `ignore_merges=True` (whole-piece
lookup first) whose merge list holds, for every multi-byte token, each split into two
in-vocabulary halves, ordered by the rank of the merged token: the merge applied first is then
always the one tiktoken picks.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

# A tiktoken rank-file line: base64 token, whitespace, decimal rank.
_RANK_LINE = re.compile(rb"^[A-Za-z0-9+/]+={0,2}[ \t]+[0-9]+\r?$")


def _bytes_to_unicode() -> list[str]:
    """The byte -> printable character table used by byte-level BPE (GPT-2 convention).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map, in byte order, to code points
    from 256 upwards, so every byte has a visible single-character stand-in.
    """
    keep = set(range(ord("!"), ord("~") + 1))
    keep |= set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    table: list[str] = []
    extra = 0
    for byte in range(256):
        if byte in keep:
            table.append(chr(byte))
        else:
            table.append(chr(256 + extra))
            extra += 1
    return table


BYTE_TO_CHAR: list[str] = _bytes_to_unicode()
# Translation table: Latin-1 decoded byte string -> byte-level characters.
_LATIN1_TO_BYTELEVEL = {byte: char for byte, char in enumerate(BYTE_TO_CHAR)}


def token_to_bytelevel(token: bytes) -> str:
    """The byte-level string under which `token` appears in the vocabulary."""
    return token.decode("latin-1").translate(_LATIN1_TO_BYTELEVEL)


def looks_like_tiktoken_file(path: str | Path) -> bool:
    """True when the file's first line has the `base64 rank` shape (not a SentencePiece proto)."""
    with open(path, "rb") as f:
        first = f.readline(4096)
    return bool(_RANK_LINE.match(first.rstrip(b"\n")))


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken rank file into {token bytes: rank}; ranks must be 0..n-1 without gaps."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            fields = line.split()
            if len(fields) != 2 or not fields[1].isdigit():
                raise ValueError(
                    f"{path}:{lineno}: expected 'base64_token rank', got {line[:60]!r}"
                )
            try:
                token = base64.b64decode(fields[0], validate=True)
            except binascii.Error as e:
                raise ValueError(f"{path}:{lineno}: bad base64 token {fields[0][:60]!r}") from e
            if token in ranks:
                raise ValueError(f"{path}:{lineno}: duplicate token {token!r}")
            ranks[token] = int(fields[1])
    if not ranks:
        raise ValueError(f"{path}: empty tiktoken rank file")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks must be the integers 0..{len(ranks) - 1}, each once")
    return ranks


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of each multi-byte token whose halves are both tokens.

    Sorted by the merged token's rank (then by the left half's length), so the BPE applies, among
    the adjacent pairs present, the one whose result tiktoken ranks lowest.
    """
    found: list[tuple[int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                found.append((rank, cut, token_to_bytelevel(left), token_to_bytelevel(right)))
    found.sort()
    return [(left, right) for _, _, left, right in found]


def build_tiktoken_tokenizer(
    ranks: dict[bytes, int],
    pattern: str,
    special_tokens: dict[str, int],
    prefix_tokens: Sequence[str] = (),
) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes exactly like tiktoken with these ranks and pattern.

    `special_tokens` maps each special string to its id (ids after the base ranks; holes are not
    allowed). `prefix_tokens` (special strings) are prepended when special tokens are requested.
    """
    vocab = {token_to_bytelevel(token): rank for token, rank in ranks.items()}
    expected = len(ranks)
    for content, token_id in sorted(special_tokens.items(), key=lambda item: item[1]):
        if token_id != expected:
            raise ValueError(
                f"special token {content!r} has id {token_id}, expected {expected}: special ids "
                "must follow the base vocabulary without holes"
            )
        expected += 1
    bpe = models.BPE(
        vocab=vocab,
        merges=merges_from_ranks(ranks),
        ignore_merges=True,
        fuse_unk=False,
        byte_fallback=False,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    ordered = sorted(special_tokens, key=special_tokens.__getitem__)
    tokenizer.add_special_tokens(
        [AddedToken(content, special=True, normalized=False) for content in ordered]
    )
    for content in ordered:
        if tokenizer.token_to_id(content) != special_tokens[content]:
            raise ValueError(f"special token {content!r} collides with a base-vocabulary token")
    if prefix_tokens:
        prefix = " ".join(prefix_tokens)
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{prefix} $A",
            pair=f"{prefix} $A $B:1",
            special_tokens=[(content, special_tokens[content]) for content in prefix_tokens],
        )
    return tokenizer
