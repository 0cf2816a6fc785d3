"""Chat templates: which one a model uses, and rendering a conversation into a prompt.

The template is, in order: the `--chat-template` override (a file, or the template text itself),
the checkpoint's own (tokenizer_config.json `chat_template` or chat_template.jinja, as the
tokenizer loaded it; the tokenizer loader supplies built-in GLM templates to remote-code GLM and
ChatGLM checkpoints whose tokenizer builds prompts in Python), or, for a GLM architecture whose
tokenizer still has none, the built-in GLM-4 template. The chosen template's syntax is checked
at startup (a syntax error stops the server with a message naming the file). Rendering goes
through transformers' `apply_chat_template`, which compiles templates in Jinja's
ImmutableSandboxedEnvironment: a template (or a message) cannot reach Python internals or mutate
the values passed in, and it has no loader, so `{% include %}` / `{% import %}` cannot read
files. A template that tries is refused at render time (a 400 naming the problem, and a warning
in the log for the operator); the server keeps serving.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from flatout.server.errors import OpenAIError
from flatout.tokenizers.templates import GLM4_CHAT_TEMPLATE

log = logging.getLogger(__name__)
_GLM_REMOTE_CODE_ARCHS = ("ChatGLMModel", "ChatGLMForConditionalGeneration", "GlmForCausalLM")
# names the renderer passes itself; a request's chat_template_kwargs may not replace them
_RESERVED = frozenset({"messages", "conversation", "tools", "documents", "chat_template",
                       "add_generation_prompt", "continue_final_message", "tokenize"})


def load_template_override(value: str) -> str:
    """`--chat-template`: a path to a Jinja file, or the template text itself."""
    path = Path(value).expanduser()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise FileNotFoundError(f"--chat-template: no such file: {value}")
    check_template_syntax(text)
    return text


def check_template_syntax(template: str) -> None:
    try:
        ImmutableSandboxedEnvironment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template has a syntax error (line {e.lineno}): {e.message}") from e


def resolve_chat_template(
    override: str | None, tokenizer: Any, architecture: str
) -> tuple[str | None, str]:
    """(template text or None, where it came from)."""
    if override is not None:
        return load_template_override(override), f"--chat-template {os.path.basename(override)}"
    own = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if isinstance(own, str) and own.strip():
        # checked now, as --chat-template is: a broken checkpoint template would otherwise turn
        # every chat request into a 400 blaming the messages
        try:
            check_template_syntax(own)
        except ValueError as e:
            raise ValueError(f"{_template_file(tokenizer)}: {e} (fix it, or start with "
                             f"--chat-template FILE)") from e
        return own, "checkpoint"
    if tokenizer is not None and architecture in _GLM_REMOTE_CODE_ARCHS:
        return GLM4_CHAT_TEMPLATE, "built-in GLM-4"
    return None, "none"


def _template_file(tokenizer: Any) -> str:
    """The checkpoint file the tokenizer's template came from (chat_template.jinja is read
    before tokenizer_config.json's `chat_template`)."""
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "."))
    jinja_file = folder / "chat_template.jinja"
    return str(jinja_file if jinja_file.is_file() else folder / "tokenizer_config.json")


class ChatRenderer:
    """Renders conversations with one template and tokenizes the result."""

    def __init__(self, tokenizer: Any, template: str | None, source: str) -> None:
        self.tokenizer = tokenizer
        self.template = template
        self.source = source

    def render(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict[str, Any]] | None = None,
        template_kwargs: dict[str, Any] | None = None,
    ) -> str:
        if self.tokenizer is None or self.template is None:
            raise OpenAIError(
                "this model has no chat template; use /v1/completions, or start the server "
                "with --chat-template FILE", code="no_chat_template",
            )
        kwargs = dict(template_kwargs or {})
        reserved = _RESERVED & kwargs.keys()
        if reserved:
            raise OpenAIError(
                f"chat_template_kwargs may not set {', '.join(sorted(reserved))}",
                param="chat_template_kwargs",
            )
        if continue_final_message:
            if add_generation_prompt:
                raise OpenAIError(
                    "continue_final_message and add_generation_prompt cannot both be true",
                    param="continue_final_message",
                )
            if messages[-1]["role"] != "assistant":
                raise OpenAIError(
                    "continue_final_message needs the last message to be the assistant's",
                    param="continue_final_message",
                )
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.template,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tokenize=False,
                **kwargs,
            )
        except SecurityError as e:  # the template reached for Python internals: refused
            raise _unsafe_template(str(e)) from e
        except jinja2.TemplateError as e:  # raise_exception() in the template: bad messages
            raise OpenAIError(f"chat template error: {e}", param="messages") from e
        except TypeError as e:
            if "no loader" in str(e):  # {% include %} / {% import %}: no files are readable
                raise _unsafe_template("it tries to load another template or a file") from e
            raise _messages_do_not_fit(e) from e
        except (ValueError, KeyError, IndexError, AttributeError) as e:
            raise _messages_do_not_fit(e) from e
        except Exception as e:  # RecursionError, the sandbox's range() limit, ...
            raise OpenAIError(f"the chat template failed: {type(e).__name__}: {e}",
                              param="messages", code="chat_template_failed") from e
        if not isinstance(text, str):
            raise OpenAIError("chat template did not render to text", param="messages")
        return text

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a rendered prompt: the template wrote the special tokens already."""
        return list(self.tokenizer.encode(prompt, add_special_tokens=False))


def _unsafe_template(why: str) -> OpenAIError:
    log.warning("chat template refused by the sandbox: %s", why)
    return OpenAIError(f"this model's chat template was stopped by the sandbox: {why}",
                       param="messages", code="chat_template_unsafe")


def _messages_do_not_fit(e: Exception) -> OpenAIError:
    return OpenAIError(f"messages do not fit this model's chat template: {type(e).__name__}: {e}",
                       param="messages")
