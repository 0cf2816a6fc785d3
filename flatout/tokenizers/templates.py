"""Built-in chat templates for GLM checkpoints that ship none (or none usable).

They are rendered by transformers' `apply_chat_template` (jinja2, `trim_blocks` and `lstrip_blocks`
on). Every template writes its own prefix tokens, because `apply_chat_template` tokenizes with
`add_special_tokens=False`. The OpenAI role `tool` is rendered as GLM's `observation`, and an
assistant message's `tool_calls` as the GLM-4 checkpoints write calls: one `<|assistant|>` turn
per call whose metadata is the function's name and whose text is its arguments as JSON
(`<|assistant|>get_weather\n{"city": "Paris"}`). Arguments arrive as objects (the server parses
OpenAI's JSON strings first); a string is written as it is.
"""

from __future__ import annotations

# The tools block shared by the GLM-4 templates: a system turn listing each function as JSON.
_GLM4_TOOLS = (
    "{%- if tools -%}"
    "{{- '<|system|>\\n# 可用工具' -}}"
    "{%- for tool in tools -%}"
    "{%- set function = tool.function if tool.function is defined else tool -%}"
    "{{- '\\n\\n## ' + function.name + '\\n\\n' + (function | tojson(indent=4)) -}}"
    "{{- '\\n在调用上述函数时，请使用 Json 格式表示调用的参数。' -}}"
    "{%- endfor -%}"
    "{%- endif -%}"
)

# An assistant message's tool calls, each as the turn the model would have written for it.
_GLM4_TOOL_CALLS = (
    "{%- for call in message.tool_calls -%}"
    "{%- set function = call.function if call.function is defined else call -%}"
    "{%- set arguments = function.arguments if function.arguments is defined else {} -%}"
    "{{- '<|assistant|>' + function.name + '\\n' -}}"
    "{{- arguments if arguments is string else arguments | tojson -}}"
    "{%- endfor -%}"
)

# glm-4-9b-chat (remote code): `[gMASK]<sop>` then `<|role|>{metadata}\n{content}` per message
# (a message without content is left out, except a tool result), generation prompt
# `<|assistant|>` (the model writes the newline itself, or a function's name).
GLM4_CHAT_TEMPLATE = "".join(
    (
        "{{- '[gMASK]<sop>' -}}",
        _GLM4_TOOLS,
        "{%- for message in messages -%}",
        "{%- set role = 'observation' if message.role == 'tool' else message.role -%}",
        "{%- if message.content or role == 'observation' -%}",
        "{{- '<|' + role + '|>' + (message.metadata or '') + '\\n' + (message.content or '') -}}",
        "{%- endif -%}",
        "{%- if role == 'assistant' and message.tool_calls -%}",
        _GLM4_TOOL_CALLS,
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}",
    )
)

# GLM-4-0414 / GLM-Z1 style: system turns first, earlier answers keep only the text after
# `</think>`, and the generation prompt opens a thinking block (`<|assistant|>\n<think>`) unless
# the caller passes `enable_thinking=False` (then it is a plain `<|assistant|>\n`).
def _glm4_0414_template(think_by_default: bool) -> str:
    thinking = ("enable_thinking is defined and not enable_thinking" if think_by_default
                else "enable_thinking is not defined or not enable_thinking")
    return "".join(
        (
            "{{- '[gMASK]<sop>' -}}",
            _GLM4_TOOLS,
            "{%- for message in messages if message.role == 'system' -%}",
            "{{- '<|system|>\\n' + message.content -}}",
            "{%- endfor -%}",
            "{%- for message in messages if message.role != 'system' -%}",
            "{%- set role = 'observation' if message.role == 'tool' else message.role -%}",
            "{%- set content = message.content or '' -%}",
            "{%- if role == 'assistant' -%}",
            "{%- set content = content.split('</think>')[-1].strip() -%}",
            "{%- endif -%}",
            "{%- if role == 'assistant' and message.tool_calls -%}",
            "{%- if content -%}{{- '<|assistant|>\\n' + content -}}{%- endif -%}",
            _GLM4_TOOL_CALLS,
            "{%- else -%}",
            "{{- '<|' + role + '|>' + (message.metadata or '') + '\\n' + content -}}",
            "{%- endif -%}",
            "{%- endfor -%}",
            "{%- if add_generation_prompt -%}",
            "{%- if " + thinking + " -%}",
            "{{- '<|assistant|>\\n' -}}",
            "{%- else -%}",
            "{{- '<|assistant|>\\n<think>' -}}",
            "{%- endif -%}",
            "{%- endif -%}",
        )
    )


GLM4_0414_CHAT_TEMPLATE = _glm4_0414_template(think_by_default=True)

# The built-in demo model's template: the same layout, but thinking is opt-in
# (`enable_thinking=True`), so that a plain request gets its text in `message.content`.
DEMO_CHAT_TEMPLATE = _glm4_0414_template(think_by_default=False)

# chatglm3-6b: `[gMASK]sop`, then `<|role|>\n content` (note the space: the original tokenizer
# encoded each message separately, which SentencePiece prefixes with a word boundary).
CHATGLM3_CHAT_TEMPLATE = (
    "{{- '[gMASK]sop' -}}"
    "{%- if tools -%}"
    "{{- '<|system|>\\n ' + (tools | tojson(indent=4)) -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set role = 'observation' if message.role == 'tool' else message.role -%}"
    "{{- '<|' + role + '|>' + (message.metadata or '') + '\\n ' + (message.content or '') -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)

# chatglm2-6b has no role tokens: `[Round n]\n\n问：{question}\n\n答：{answer}\n\n`. System text
# (which the model never saw in training) is put before the first round.
CHATGLM2_CHAT_TEMPLATE = (
    "{{- '[gMASK]sop' -}}"
    "{%- set ns = namespace(round=0) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'system' -%}"
    "{{- message.content + '\\n\\n' -}}"
    "{%- elif message.role == 'user' -%}"
    "{%- set ns.round = ns.round + 1 -%}"
    "{{- '[Round ' + ns.round | string + ']\\n\\n问：' + message.content + '\\n\\n答：' -}}"
    "{%- elif message.role == 'assistant' -%}"
    "{{- message.content + '\\n\\n' -}}"
    "{%- else -%}"
    "{{- raise_exception('chatglm2 chat supports the roles system, user and assistant only') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# chatglm-6b (v1), as its chat(): a lone question is the prompt itself; with history each round
# is `[Round i]\n问：{question}\n答：{answer}\n` (i from 0) and the last one ends at `答：`. The
# prompt then ends with `[gMASK]<sop>`, which the model needs (its bidirectional context ends at
# <sop>). The model has no system role.
CHATGLM_V1_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.role not in ('user', 'assistant') -%}"
    "{{- raise_exception('chatglm-6b chat supports the roles user and assistant only') -}}"
    "{%- elif (message.role == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{- raise_exception('chatglm-6b chat needs user and assistant turns in alternation, "
    "starting with user') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if messages | length == 1 -%}"
    "{{- messages[0].content -}}"
    "{%- else -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'user' -%}"
    "{{- '[Round ' + (loop.index0 // 2) | string + ']\\n问：' + message.content + '\\n答：' -}}"
    "{%- else -%}"
    "{{- message.content + '\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '[gMASK]<sop>' -}}"
)
