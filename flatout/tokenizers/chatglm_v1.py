"""ChatGLM-6B v1 tokenizer (`ice_text.model`), written from the checkpoint's documented behaviour
(never by running its remote code):

- a SentencePiece model whose pieces include the GLM special tokens `[MASK] [gMASK] [sMASK]
  <unused_0> <sop> <eop> <ENC> <dBLOCK>`, and `<n>`, `<|tab|>`, `<|blank_2|>`..`<|blank_80|>`;
  token id = piece id + `num_image_tokens` (tokenizer_config.json; ids below it are image
  tokens, which decode to nothing);
- text normalisation before SentencePiece: `\\n` -> `<n>`, `\\t` -> `<|tab|>`, a run of 2..80
  spaces -> `<|blank_N|>` (longest runs first); decoding reverses it;
- special tokens written in the text are kept whole and the runs between them are encoded
  separately (each with SentencePiece's word-boundary prefix);
- with `add_special_tokens=True`, `[gMASK] <sop>` is appended: v1 prompts end with them, and
  everything before <sop> is the bidirectional context;
- eos is `<eop>` (the chat model's end of answer), bos `<sop>`, padding `<pad>` on the left.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence

import sentencepiece as spm
from transformers import PreTrainedTokenizer

CHATGLM_V1_SPECIAL_TOKENS = (
    "[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>",
)  # fmt: skip
MAX_BLANK_LENGTH = 80
_BLANK_RE = re.compile(r"<\|blank_(\d+)\|>")


def normalize_v1(text: str) -> str:
    """The original's text normalisation before SentencePiece."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    # the longest runs first, so a run of 5 spaces becomes one <|blank_5|>
    return re.sub(
        " {2,}",
        lambda m: "".join(
            f"<|blank_{n}|>" if n > 1 else " "
            for n in _split_run(len(m.group(0)))
        ),
        text,
    )


def _split_run(n: int) -> list[int]:
    """A run of n spaces as the original replaces it: blanks of 80 first, then the rest."""
    parts = [MAX_BLANK_LENGTH] * (n // MAX_BLANK_LENGTH)
    if n % MAX_BLANK_LENGTH:
        parts.append(n % MAX_BLANK_LENGTH)
    return parts


def denormalize_v1(text: str) -> str:
    """Undo `normalize_v1` on decoded text."""
    text = text.replace("<n>", "\n").replace("<|tab|>", "\t")

    def blank(m: re.Match[str]) -> str:
        n = int(m.group(1))
        return " " * n if 2 <= n <= MAX_BLANK_LENGTH else m.group(0)

    return _BLANK_RE.sub(blank, text)


class ChatGLMv1Tokenizer(PreTrainedTokenizer):
    """Tokenizer of THUDM/chatglm-6b, backed by the `sentencepiece` library."""

    vocab_files_names = {"vocab_file": "ice_text.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file: str, num_image_tokens: int = 0, **kwargs) -> None:
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"SentencePiece model not found: {vocab_file}")
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor()
        try:
            self.sp_model.Load(vocab_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{vocab_file} is not a SentencePiece model: {e}") from e
        if num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must be >= 0 (got {num_image_tokens})")
        self.num_image_tokens = num_image_tokens
        unk = self.sp_model.unk_id()
        missing = [t for t in CHATGLM_V1_SPECIAL_TOKENS if self.sp_model.piece_to_id(t) == unk]
        if missing:
            raise ValueError(f"{vocab_file} lacks the ChatGLM-6B special pieces {missing}")
        self._special_ids = {t: self.sp_model.piece_to_id(t) + num_image_tokens
                             for t in CHATGLM_V1_SPECIAL_TOKENS}
        self._special_re = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(CHATGLM_V1_SPECIAL_TOKENS, key=len,
                                                        reverse=True)) + ")"
        )
        for key, piece in (("bos_token", "<sop>"), ("eos_token", "<eop>"),
                           ("mask_token", "[MASK]")):
            kwargs.setdefault(key, piece)
        kwargs.setdefault("unk_token", self.sp_model.id_to_piece(unk))
        pad = "<pad>" if self.sp_model.piece_to_id("<pad>") != unk else kwargs["unk_token"]
        kwargs.setdefault("pad_token", pad)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("extra_special_tokens", [
            t for t in CHATGLM_V1_SPECIAL_TOKENS if t not in ("<sop>", "<eop>", "[MASK]")
        ])
        kwargs.setdefault("padding_side", "left")
        super().__init__(special_tokens_pattern="prefix_suffix", **kwargs)
        # read by the "prefix_suffix" pattern of build_inputs_with_special_tokens
        self.prefix_tokens: list[int] = []
        self.suffix_tokens = [self._special_ids["[gMASK]"], self._special_ids["<sop>"]]

    # -- vocabulary -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.num_image_tokens + self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        n = self.num_image_tokens
        vocab = {f"<image_{i}>": i for i in range(n)}
        vocab.update({self.sp_model.id_to_piece(i): i + n
                      for i in range(self.sp_model.get_piece_size())})
        return vocab

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self._special_ids)

    def _convert_token_to_id(self, token: str) -> int:
        m = re.fullmatch(r"<image_(\d+)>", token)
        if m and int(m.group(1)) < self.num_image_tokens:
            return int(m.group(1))
        return self.sp_model.piece_to_id(token) + self.num_image_tokens

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"token id {index} is outside the vocabulary (size {self.vocab_size})")
        if index < self.num_image_tokens:
            return f"<image_{index}>"
        return self.sp_model.id_to_piece(index - self.num_image_tokens)

    # -- encoding -------------------------------------------------------------------------------
    # the signature of transformers' own PreTrainedTokenizer.tokenize, which narrows its base's
    def tokenize(self, text: str, **kwargs) -> list[str]:  # type: ignore[override]
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        if split_special_tokens:
            return self._tokenize(text)
        tokens: list[str] = []
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2 == 1:
                tokens.append(part)
            elif part:
                tokens.extend(self._tokenize(part))
        return tokens

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(normalize_v1(text), out_type=str)

    # -- decoding -------------------------------------------------------------------------------
    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return self._decode_ids(ids, skip)

    def _decode_ids(self, ids: Sequence[int], skip_ids: set[int]) -> str:
        pieces = []
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} is outside the vocabulary "
                                 f"(size {self.vocab_size})")
            if token_id in skip_ids or token_id < self.num_image_tokens:
                continue
            pieces.append(token_id - self.num_image_tokens)
        return denormalize_v1(self.sp_model.decode(pieces))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode_ids([self._convert_token_to_id(t) for t in tokens], set())

    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "ice_text.model"
        target = os.path.join(save_directory, name)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
