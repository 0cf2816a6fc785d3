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


TOOL_TURNS = [
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "北京", "days": 2}'}},
        {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    {"role": "tool", "tool_call_id": "call_2", "content": ""},
]


def _tool_msgs(raw: list[dict]) -> list[dict]:
    return chat_messages([ChatMessage.model_validate(m) for m in raw])


@pytest.mark.parametrize(("arch", "prompt_end"), [("ChatGLMModel", "<|assistant|>"),
                                                  ("Glm4ForCausalLM", "<|assistant|>\n")])
def test_glm4_templates_write_tool_calls_and_results_as_the_checkpoints(
        tok: PreTrainedTokenizerFast, arch: str, prompt_end: str) -> None:
    # GLM-4's own history format: a call is an assistant turn whose metadata is the function's
    # name and whose text is its arguments; a result is an observation turn
    bare = PreTrainedTokenizerFast.from_pretrained(str(ASSETS))
    if arch == "ChatGLMModel":
        bare.chat_template = None  # the built-in GLM-4-9B-chat template
    text = renderer(bare, arch=arch).render(_tool_msgs(TOOL_TURNS))
    assert text == ('[gMASK]<sop><|user|>\nWeather?<|assistant|>get_weather\n{"city": "北京", '
                    '"days": 2}<|assistant|>now\n{}<|observation|>\n{"temp": 21}'
                    "<|observation|>\n" + prompt_end)
    # an answer beside the calls comes first, in its own turn
    with_text = [TOOL_TURNS[0], {**TOOL_TURNS[1], "content": "Let me look."}]
    assert "<|assistant|>\nLet me look.<|assistant|>get_weather\n" in renderer(
        bare, arch=arch).render(_tool_msgs(with_text))


def test_history_arguments_are_parsed_for_templates_that_iterate_them(
        tok: PreTrainedTokenizerFast) -> None:
    iterate = renderer(tok, "{% for m in messages %}{% for c in m.tool_calls or [] %}"
                            "{% for k, v in c.function.arguments.items() %}{{ k }}={{ v }};"
                            "{% endfor %}{% endfor %}{% endfor %}")
    assert iterate.render(_tool_msgs(TOOL_TURNS)) == "city=北京;days=2;"


@pytest.mark.parametrize(("call", "param"), [
    ({"type": "function", "function": {"name": "f", "arguments": "{not json"}},
     "messages[1].tool_calls[0].function.arguments"),
    ({"type": "function", "function": {"name": "f", "arguments": "[1, 2]"}},
     "messages[1].tool_calls[0].function.arguments"),
    ({"type": "function", "function": {"name": "f"}},
     "messages[1].tool_calls[0].function.arguments"),
    ({"type": "function", "function": {"arguments": "{}"}}, "messages[1].tool_calls[0]"),
    ({"type": "code", "function": {"name": "f", "arguments": "{}"}}, "messages[1].tool_calls[0]"),
    ("f()", "messages[1].tool_calls[0]"),
])
def test_malformed_history_tool_calls_are_400s_naming_the_field(call: object, param: str) -> None:
    raw = [TOOL_TURNS[0], {"role": "assistant", "content": None, "tool_calls": [call]}]
    with pytest.raises(OpenAIError) as e:
        _tool_msgs(raw)
    assert e.value.status == 400 and e.value.param == param
    with pytest.raises(OpenAIError) as e:
        _tool_msgs([TOOL_TURNS[0], {"role": "assistant", "tool_calls": {"a": 1}}])
    assert e.value.param == "messages[1].tool_calls"
