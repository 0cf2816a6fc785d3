"""Tokenizer loading for every supported checkpoint format (see `loader` for the formats)."""

from flatout.tokenizers.loader import (
    GLM4_PATTERN,
    GLM4_SPECIAL_TOKENS,
    GLM_STOP_TOKENS,
    load_tokenizer,
    stop_token_ids,
)

__all__ = [
    "GLM4_PATTERN",
    "GLM4_SPECIAL_TOKENS",
    "GLM_STOP_TOKENS",
    "load_tokenizer",
    "stop_token_ids",
]
