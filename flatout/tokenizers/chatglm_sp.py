"""ChatGLM2 / ChatGLM3 tokenizer: a SentencePiece model plus special tokens after its vocabulary.

Written from the checkpoints' documented behaviour (never by running their remote code):
- ids `0..n-1` are the SentencePiece pieces; `[MASK] [gMASK] [sMASK] sop eop` follow at `n..n+4`;
  ChatGLM3 appends `<|system|> <|user|> <|assistant|> <|observation|>`.
- text runs between special tokens are encoded by SentencePiece exactly as `sp.encode` does
  (so each run gets SentencePiece's word-boundary prefix, as the original tokenizer did);
- with `add_special_tokens=True`, `[gMASK] sop` is prepended;
- eos is the SentencePiece `</s>`, padding uses `<unk>` on the left.

`sop` and `eop` are ordinary words too ("isopropyl"), so in input text they count as special tokens
only when they directly follow another special token, which is how GLM prompts write them
(`[gMASK]sop<|user|>`). Every other special token is recognised anywhere in the text.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Sequence

import sentencepiece as spm
from tokenizers import AddedToken
from transformers import PreTrainedTokenizer

CHATGLM_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")
CHATGLM3_ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
# Special tokens that are also plain words: recognised only right after another special token.
_ATTACHED_SPECIALS = ("sop", "eop")


class ChatGLMSentencePieceTokenizer(PreTrainedTokenizer):
    """Tokenizer of chatglm2-6b / chatglm3-6b, backed by the `sentencepiece` library."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"

    def __init__(self, vocab_file: str, role_tokens: bool = False, **kwargs) -> None:
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"SentencePiece model not found: {vocab_file}")
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor()
        try:
            self.sp_model.Load(vocab_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{vocab_file} is not a SentencePiece model: {e}") from e
        self.role_tokens = role_tokens
        num_pieces = self.sp_model.get_piece_size()
        specials = CHATGLM_SPECIAL_TOKENS + (CHATGLM3_ROLE_TOKENS if role_tokens else ())
        added = {
            num_pieces + i: AddedToken(content, special=True, normalized=False)
            for i, content in enumerate(specials)
        }
        self._special_ids = {content: num_pieces + i for i, content in enumerate(specials)}
        self._special_re = re.compile(
            "("
            + "|".join(
                re.escape(content)
                for content in sorted(specials, key=len, reverse=True)
                if content not in _ATTACHED_SPECIALS
            )
            + ")"
        )
        unk = self.sp_model.id_to_piece(self.sp_model.unk_id())
        eos_id = self.sp_model.eos_id()
        kwargs.setdefault("eos_token", self.sp_model.id_to_piece(eos_id) if eos_id >= 0 else None)
        kwargs.setdefault("unk_token", unk)
        kwargs.setdefault("pad_token", unk)
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("extra_special_tokens", list(specials))
        kwargs.setdefault("padding_side", "left")
        super().__init__(
            added_tokens_decoder=added, special_tokens_pattern="prefix_suffix", **kwargs
        )
        # Read by the "prefix_suffix" pattern of build_inputs_with_special_tokens.
        self.prefix_tokens = [self._special_ids["[gMASK]"], self._special_ids["sop"]]
        self.suffix_tokens: list[int] = []

    # -- vocabulary -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of SentencePiece pieces (special tokens come after them)."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self._added_tokens_encoder)
        return vocab

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        if not 0 <= index < self.vocab_size:
            raise ValueError(f"token id {index} is outside the vocabulary (size {len(self)})")
        return self.sp_model.id_to_piece(index)

    # -- encoding -------------------------------------------------------------------------------
    # the signature of transformers' own PreTrainedTokenizer.tokenize, which narrows its base's
    def tokenize(self, text: str, **kwargs) -> list[str]:  # type: ignore[override]
        split_special_tokens = kwargs.pop("split_special_tokens", self.split_special_tokens)
        text, kwargs = self.prepare_for_tokenization(text, **kwargs)
        if split_special_tokens:
            return self._tokenize(text)
        tokens: list[str] = []
        after_special = False
        # re.split with one capture group alternates text, special, text, special, ..., text.
        for i, part in enumerate(self._special_re.split(text)):
            if i % 2 == 1:
                tokens.append(part)
                after_special = True
                continue
            while after_special and part[:3] in _ATTACHED_SPECIALS:
                tokens.append(part[:3])
                part = part[3:]
            if part:
                tokens.extend(self._tokenize(part))
                after_special = False
        return tokens

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    # -- decoding -------------------------------------------------------------------------------
    def _decode_ids(self, ids: Sequence[int], skip_ids: set[int]) -> str:
        pieces: list[str] = []
        run: list[int] = []
        num_pieces = self.vocab_size
        for token_id in ids:
            if token_id in skip_ids:
                continue
            if 0 <= token_id < num_pieces:
                run.append(token_id)
                continue
            if token_id not in self._added_tokens_decoder:
                raise ValueError(
                    f"token id {token_id} is outside the vocabulary (size {len(self)})"
                )
            if run:
                pieces.append(self.sp_model.decode(run))
                run = []
            pieces.append(self._added_tokens_decoder[token_id].content)
        if run:
            pieces.append(self.sp_model.decode(run))
        return "".join(pieces)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs,
    ) -> str:
        ids = [token_ids] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        skip_ids = set(self.all_special_ids) if skip_special_tokens else set()
        text = self._decode_ids(ids, skip_ids)
        if clean_up_tokenization_spaces:
            text = self.clean_up_tokenization(text)
        return text

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        ids = [self._convert_token_to_id_with_added_voc(token) for token in tokens]
        return self._decode_ids(ids, set())

    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model"
        target = os.path.join(save_directory, name)
        if os.path.abspath(target) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, target)
        return (target,)
