"""The detokenizer's direct path to the Rust tokenizer (`backend_decoder`): taken only where it
returns exactly what `tokenizer.decode` returns, and then equal to it on any window of ids
(special tokens, invalid UTF-8 bytes, skipping special tokens or not); the incremental text is the
same either way."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from flatout.demo import ASSETS
from flatout.engine.detokenizer import IncrementalDetokenizer, backend_decoder
from flatout.tokenizers import load_tokenizer


@pytest.fixture(scope="module")
def tok() -> Any:
    return load_tokenizer(ASSETS)


@pytest.mark.parametrize("skip", [True, False])
def test_backend_decode_equals_tokenizer_decode(tok: Any, skip: bool) -> None:
    decode = backend_decoder(tok, skip)
    assert decode is not None  # the demo tokenizer is a plain fast tokenizer
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(2000):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(0, 8))]
        assert decode(ids) == tok.decode(ids, skip_special_tokens=skip), ids


def test_no_backend_path_where_decode_post_processes(tok: Any) -> None:
    cleaning = copy.deepcopy(tok)
    cleaning.clean_up_tokenization_spaces = True
    assert backend_decoder(cleaning, True) is None

    class OwnDecode(type(tok)):  # type: ignore[misc]
        def _decode(self, token_ids: Any, skip_special_tokens: bool = False,
                    **kwargs: Any) -> str:
            return "own"

    own = copy.deepcopy(tok)
    own.__class__ = OwnDecode
    assert backend_decoder(own, True) is None
    detok = IncrementalDetokenizer(own, [1, 2])
    detok.add_token(5)
    assert detok._decode([5]) == "own"  # the tokenizer's own decode is used


def test_incremental_text_is_the_same_through_either_path(tok: Any) -> None:
    rng = random.Random(1)
    ids = [rng.randrange(len(tok)) for _ in range(400)]
    fast = IncrementalDetokenizer(tok, [3, 4, 5], stop=["zz"])
    slow = IncrementalDetokenizer(tok, [3, 4, 5], stop=["zz"])
    slow._backend_decode = None
    assert fast._backend_decode is not None
    for t in ids:
        assert fast.add_token(t) == slow.add_token(t)
    assert fast.flush() == slow.flush()
    assert (fast.text, fast.token_texts, fast.stopped_by) == (
        slow.text, slow.token_texts, slow.stopped_by)
