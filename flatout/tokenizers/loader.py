"""Load the tokenizer of any supported checkpoint folder as one transformers tokenizer object.

Formats, in the order they are looked for:
- `tokenizer.json` (Llama, Qwen, GLM-*-hf, GLM-4-0414, the demo model): transformers' fast
  tokenizer. When `tokenizer_config.json` names remote code (`auto_map`, or a class transformers
  lacks), the file is loaded directly as `PreTrainedTokenizerFast` with the config's special
  tokens and chat template.
- `tokenizer.model` in tiktoken format (glm-4-9b-chat remote code): a byte-level BPE built here.
- `tokenizer.model` in SentencePiece format (chatglm2-6b, chatglm3-6b):
  `ChatGLMSentencePieceTokenizer`.
- `ice_text.model` (chatglm-6b v1): `ChatGLMv1Tokenizer` (its text normalisation included).
Python files shipped with a checkpoint are never imported or executed (`trust_remote_code` is off).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Container
from pathlib import Path
from typing import Any

import sentencepiece as spm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

from flatout.tokenizers.chatglm_sp import CHATGLM3_ROLE_TOKENS, ChatGLMSentencePieceTokenizer
from flatout.tokenizers.chatglm_v1 import ChatGLMv1Tokenizer
from flatout.tokenizers.templates import (
    CHATGLM2_CHAT_TEMPLATE,
    CHATGLM3_CHAT_TEMPLATE,
    CHATGLM_V1_CHAT_TEMPLATE,
    GLM4_CHAT_TEMPLATE,
)
from flatout.tokenizers.tiktoken_bpe import (
    build_tiktoken_tokenizer,
    looks_like_tiktoken_file,
    read_tiktoken_ranks,
)

logger = logging.getLogger(__name__)

# glm-4-9b-chat's pre-tokenizer regex (tiktoken / fancy-regex syntax, also valid in Oniguruma).
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# glm-4-9b-chat's special tokens, in id order, starting right after the base ranks (151329...).
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
# A GLM-4 vocabulary is recognised by these added tokens (used for templates and stop tokens).
_GLM4_MARKERS = ("[gMASK]", "<sop>", "<|user|>", "<|assistant|>")
# Stop tokens of the GLM chat models: end of text, and the roles that open the next turn.
GLM_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _names_remote_code(tokenizer_config: dict[str, Any]) -> bool:
    """True when the config points at a tokenizer class that only the checkpoint's code defines."""
    auto_map = tokenizer_config.get("auto_map")
    if isinstance(auto_map, (list, tuple)) or (
        isinstance(auto_map, dict) and "AutoTokenizer" in auto_map
    ):
        return True
    name = tokenizer_config.get("tokenizer_class")
    if not name:
        return False
    return (
        tokenizer_class_from_name(name) is None and tokenizer_class_from_name(name + "Fast") is None
    )


def _checkpoint_chat_template(folder: Path, tokenizer_config: dict[str, Any]) -> str | dict | None:
    """The checkpoint's chat template (chat_template.jinja first), or None when it ships none."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8") or None
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = {item["name"]: item["template"] for item in template}
    return template or None


def _special_kwargs(tokenizer_config: dict[str, Any], vocab: Container[str]) -> dict[str, Any]:
    """The tokenizer_config settings a GLM remote-code config may override: eos/pad/unk/bos
    tokens (only those in `vocab`; others would be appended as new tokens), length, padding side."""
    kwargs: dict[str, Any] = {}
    for key in ("eos_token", "pad_token", "unk_token", "bos_token"):
        value = tokenizer_config.get(key)
        content = value.get("content") if isinstance(value, dict) else value  # AddedToken dict
        if isinstance(content, str) and content in vocab:
            kwargs[key] = content
    for key in ("model_max_length", "padding_side"):
        if tokenizer_config.get(key) is not None:
            kwargs[key] = tokenizer_config[key]
    return kwargs


def _load_tokenizer_json(folder: Path, tokenizer_config: dict[str, Any]) -> PreTrainedTokenizerBase:
    if not _names_remote_code(tokenizer_config):
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    # The config names remote code: load tokenizer.json with transformers' own generic class,
    # which reads tokenizer_config.json (specials, chat_template) and chat_template.jinja itself.
    logger.info("%s: tokenizer_config names remote code; loading tokenizer.json directly", folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder), trust_remote_code=False)


def _load_glm4_tiktoken(folder: Path, tokenizer_config: dict[str, Any]) -> PreTrainedTokenizerBase:
    ranks = read_tiktoken_ranks(folder / "tokenizer.model")
    specials = {content: len(ranks) + i for i, content in enumerate(GLM4_SPECIAL_TOKENS)}
    # added_tokens_decoder may name more (or other) specials after the base vocabulary.
    for key, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        content = entry.get("content") if isinstance(entry, dict) else str(entry)
        token_id = int(key)
        if token_id >= len(ranks) and content:
            specials = {c: i for c, i in specials.items() if i != token_id and c != content}
            specials[content] = token_id
    for gap in sorted(set(range(len(ranks), max(specials.values()) + 1)) - set(specials.values())):
        specials[f"<|reserved_{gap}|>"] = gap
    backend = build_tiktoken_tokenizer(
        ranks, GLM4_PATTERN, specials, prefix_tokens=("[gMASK]", "<sop>")
    )
    kwargs = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "padding_side": "left"}
    kwargs.update(_special_kwargs(tokenizer_config, specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        name_or_path=str(folder),
        extra_special_tokens=sorted(specials, key=specials.__getitem__),
        clean_up_tokenization_spaces=False,
        chat_template=_checkpoint_chat_template(folder, tokenizer_config) or GLM4_CHAT_TEMPLATE,
        **kwargs,
    )


def _sentencepiece_pieces(model_file: Path) -> set[str]:
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(model_file))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{model_file} is not a SentencePiece model: {e}") from e
    return {processor.id_to_piece(i) for i in range(processor.get_piece_size())}


def _is_chatglm3(folder: Path, tokenizer_config: dict[str, Any]) -> bool:
    """ChatGLM3 and ChatGLM2 ship the same SentencePiece model: tell them apart by side files."""
    template = tokenizer_config.get("chat_template")
    # A template that renders role tokens (`<|user|>`, `<|{{ role }}|>`) belongs to chatglm3.
    if isinstance(template, str) and "<|" in template:
        return True
    code = folder / "tokenization_chatglm.py"
    # Read as text only, never imported: chatglm3's tokenizer code lists the role tokens.
    if code.is_file() and CHATGLM3_ROLE_TOKENS[-1] in code.read_text(
        encoding="utf-8", errors="replace"
    ):
        return True
    config = read_json(folder / "config.json")
    names = (
        folder.resolve().name,
        tokenizer_config.get("name_or_path"),
        tokenizer_config.get("_name_or_path"),
        config.get("_name_or_path"),
    )
    return any(isinstance(name, str) and "chatglm3" in name.lower() for name in names)


def _load_chatglm_sentencepiece(
    folder: Path, tokenizer_config: dict[str, Any]
) -> PreTrainedTokenizerBase:
    v3 = _is_chatglm3(folder, tokenizer_config)
    builtin = CHATGLM3_CHAT_TEMPLATE if v3 else CHATGLM2_CHAT_TEMPLATE
    model_file = folder / "tokenizer.model"
    pieces = _sentencepiece_pieces(model_file)
    kwargs = {
        k: v for k, v in _special_kwargs(tokenizer_config, pieces).items() if k != "bos_token"
    }
    return ChatGLMSentencePieceTokenizer(
        str(model_file),
        role_tokens=v3,
        name_or_path=str(folder),
        chat_template=_checkpoint_chat_template(folder, tokenizer_config) or builtin,
        **kwargs,
    )


def _load_chatglm_v1(folder: Path, tokenizer_config: dict[str, Any]) -> PreTrainedTokenizerBase:
    for key in ("do_lower_case", "remove_space"):
        if tokenizer_config.get(key):
            raise ValueError(f"{folder}: tokenizer_config {key}: true is not supported")
    return ChatGLMv1Tokenizer(
        str(folder / "ice_text.model"),
        # the original class's default when the config does not say (chatglm-6b's says 0)
        num_image_tokens=int(tokenizer_config.get("num_image_tokens", 20000)),
        name_or_path=str(folder),
        chat_template=_checkpoint_chat_template(folder, tokenizer_config)
        or CHATGLM_V1_CHAT_TEMPLATE,
    )


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load a checkpoint folder's tokenizer, whatever format it ships, without running its code.

    Returns a transformers tokenizer (encode, decode, convert_ids_to_tokens, all_special_ids,
    eos_token_id, apply_chat_template). GLM checkpoints that ship no chat template get a
    built-in one. Raises FileNotFoundError when the folder holds no tokenizer, ValueError for
    malformed files.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {folder}")
    tokenizer_config = read_json(folder / "tokenizer_config.json")
    if (folder / "tokenizer.json").is_file():
        read_json(folder / "tokenizer.json")  # a malformed file is named, not a parser's message
        try:
            tokenizer = _load_tokenizer_json(folder, tokenizer_config)
        except Exception as e:  # the tokenizers library raises bare Exceptions on bad content
            raise ValueError(f"{folder / 'tokenizer.json'}: cannot be loaded: {e}") from e
        if tokenizer.chat_template is None and _has_tokens(tokenizer, _GLM4_MARKERS):
            tokenizer.chat_template = GLM4_CHAT_TEMPLATE
        return tokenizer
    if (folder / "tokenizer.model").is_file():
        if looks_like_tiktoken_file(folder / "tokenizer.model"):
            return _load_glm4_tiktoken(folder, tokenizer_config)
        return _load_chatglm_sentencepiece(folder, tokenizer_config)
    if (folder / "ice_text.model").is_file():
        return _load_chatglm_v1(folder, tokenizer_config)
    if (folder / "vocab.json").is_file() and not _names_remote_code(tokenizer_config):
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    raise FileNotFoundError(
        f"{folder}: no tokenizer found (looked for tokenizer.json, tokenizer.model, vocab.json)"
    )


def _has_tokens(tokenizer: PreTrainedTokenizerBase, contents: tuple[str, ...]) -> bool:
    added = tokenizer.get_added_vocab()
    return all(content in added for content in contents)


def _config_eos_ids(folder: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        config = read_json(folder / name)
        for section in (config, config.get("text_config") or {}):
            value = section.get("eos_token_id")
            if isinstance(value, int):
                ids.append(value)
            elif isinstance(value, list):
                ids.extend(v for v in value if isinstance(v, int))
    return ids


def stop_token_ids(
    tokenizer: PreTrainedTokenizerBase, checkpoint_dir: str | os.PathLike[str] | None = None
) -> list[int]:
    """Token ids that end generation, in a stable order without duplicates.

    The union of `eos_token_id` from generation_config.json and config.json (also a VL model's
    `text_config`), the tokenizer's eos, and, for GLM-family vocabularies (those with `[gMASK]`),
    the ids of `<|endoftext|>`, `<|user|>` and `<|observation|>` that the vocabulary has: GLM chat
    models end a turn by opening the next one, and their configs do not always list all three.
    """
    ids = _config_eos_ids(Path(checkpoint_dir)) if checkpoint_dir is not None else []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    added = tokenizer.get_added_vocab()
    if "[gMASK]" in added:
        ids.extend(added[content] for content in GLM_STOP_TOKENS if content in added)
    return list(dict.fromkeys(ids))
