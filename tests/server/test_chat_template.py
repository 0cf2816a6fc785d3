"""Chat templates: the checkpoint's own (the demo's GLM-Z1-style one, thinking opt-in),
overrides, the built-in GLM-4 fallback, and the sandbox."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from flatout.demo import ASSETS
from flatout.server.chat import ChatRenderer, resolve_chat_template
from flatout.server.errors import OpenAIError
from flatout.server.protocol import ChatMessage, chat_messages
from flatout.tokenizers.templates import GLM4_CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(str(ASSETS))


def renderer(tok: PreTrainedTokenizerFast, override: str | None = None,
             arch: str = "Glm4ForCausalLM") -> ChatRenderer:
    template, source = resolve_chat_template(override, tok, arch)
    return ChatRenderer(tok, template, source)


def msgs(*pairs: tuple[str, object]) -> list[dict]:
    return chat_messages([ChatMessage.model_validate({"role": r, "content": c}) for r, c in pairs])


def test_checkpoint_template_multi_turn_with_thinking_switch(tok: PreTrainedTokenizerFast) -> None:
    r = renderer(tok)
    assert r.source == "checkpoint"
    conv = msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "<think>x</think>Hello"),
                ("user", "你是谁?"))
    text = r.render(conv, template_kwargs={"enable_thinking": True})
    assert text == ("[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello"
                    "<|user|>\n你是谁?<|assistant|>\n<think>")
    for kwargs in ({"enable_thinking": False}, None):  # the demo thinks only when asked
        off = r.render(conv, template_kwargs=kwargs)
        assert off.endswith("<|user|>\n你是谁?<|assistant|>\n")
    ids = r.encode(text)
    assert ids[:2] == tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])  # no doubled prefix
    assert ids[-1] == tok.convert_tokens_to_ids("<think>")


def test_content_as_list_of_text_parts(tok: PreTrainedTokenizerFast) -> None:
    r = renderer(tok)
    parts = [{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}]
    assert r.render(msgs(("user", parts))) == r.render(msgs(("user", "line one\nline two")))
    with pytest.raises(OpenAIError) as e:
        msgs(("user", [{"type": "image_url", "image_url": {"url": "http://x"}}]))
    assert e.value.status == 400 and e.value.param == "messages[0].content[0]"


def test_override_file_and_inline(tok: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}")
    r = renderer(tok, str(f))
    assert r.source.startswith("--chat-template")
    assert r.render(msgs(("user", "hi"))) == "[user]hi"
    assert renderer(tok, "{{ messages[0].content }}!").render(msgs(("user", "a"))) == "a!"
    with pytest.raises(FileNotFoundError):
        renderer(tok, str(tmp_path / "missing.jinja"))
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="syntax"):
        renderer(tok, str(bad))


def test_builtin_glm4_template_for_remote_code_checkpoints(tok: PreTrainedTokenizerFast) -> None:
    bare = PreTrainedTokenizerFast.from_pretrained(str(ASSETS))
    bare.chat_template = None
    template, source = resolve_chat_template(None, bare, "ChatGLMModel")
    assert template == GLM4_CHAT_TEMPLATE and source == "built-in GLM-4"
    text = ChatRenderer(bare, template, source).render(msgs(("system", "S"), ("user", "Hello")))
    assert text == "[gMASK]<sop><|system|>\nS<|user|>\nHello<|assistant|>"
    assert resolve_chat_template(None, bare, "LlamaForCausalLM") == (None, "none")
    with pytest.raises(OpenAIError, match="no chat template"):
        ChatRenderer(bare, None, "none").render(msgs(("user", "x")))


def test_sandbox_and_template_errors_are_client_errors(tok: PreTrainedTokenizerFast) -> None:
    # message text is data, never template code
    r = renderer(tok, "{% for m in messages %}{{ m.content }}{% endfor %}")
    assert r.render(msgs(("user", "{{ 7 * 7 }}"))) == "{{ 7 * 7 }}"
    escape = renderer(tok, "{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(OpenAIError, match="unsafe") as e:
        escape.render(msgs(("user", "x")))
    assert e.value.status == 400
    mutate = renderer(tok, "{{ messages.append(1) }}")  # the environment is immutable
    with pytest.raises(OpenAIError, match="unsafe"):
        mutate.render(msgs(("user", "x")))
    strict = renderer(tok, "{% if messages[0].role != 'system' %}"
                           "{{ raise_exception('system first') }}{% endif %}")
    with pytest.raises(OpenAIError, match="system first"):
        strict.render(msgs(("user", "x")))
    with pytest.raises(OpenAIError, match="chat_template_kwargs"):
        r.render(msgs(("user", "x")), template_kwargs={"add_generation_prompt": False})
