"""`echo` of /v1/completions prompts, checked on the prepared request (no engine)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from flatout.sampling_params import SamplingParams
from flatout.server.protocol import CompletionRequest
from flatout.server.serving_completion import prepare_completion


class _Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], **_: Any) -> str:
        return "".join(chr(i) for i in ids)


def _state(tokenizer: _Tokenizer | None) -> Any:
    client = SimpleNamespace(default_sampling_params=lambda **kw: SamplingParams(**kw),
                             inputs=SimpleNamespace(validate=lambda ids, params: None))
    return SimpleNamespace(check_model=lambda name: name, client=client, tokenizer=tokenizer,
                           max_prompt_chars=10_000)


def test_echo_texts_with_and_without_a_tokenizer() -> None:
    req = CompletionRequest(model="m", prompt=[[104, 105], [33]], echo=True)
    assert prepare_completion(_state(_Tokenizer()), req).echo_texts == ["hi", "!"]
    # no tokenizer: token-id prompts echo no text (they used to echo the id list itself, and
    # the response then failed adding it to the generated text)
    p = prepare_completion(_state(None), req)
    assert p.prompts == [[104, 105], [33]] and p.echo_texts == ["", ""]
    text = CompletionRequest(model="m", prompt="hi", echo=True)
    assert prepare_completion(_state(_Tokenizer()), text).echo_texts == ["hi"]
    quiet = CompletionRequest(model="m", prompt=[[104, 105]])
    assert prepare_completion(_state(_Tokenizer()), quiet).echo_texts == [""]
