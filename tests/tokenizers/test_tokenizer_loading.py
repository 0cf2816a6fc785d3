"""tokenizer.json checkpoints, remote-code configs that must never run, and loader errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from flatout.tokenizers import GLM4_PATTERN, load_tokenizer, stop_token_ids
from flatout.tokenizers.templates import GLM4_CHAT_TEMPLATE
from tests.tokenizers.tokenizer_fixtures import (
    CORPUS,
    SAMPLE_TEXTS,
    train_spm_model,
    write_tiktoken_file,
)

GLM_SPECIALS = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                "<|user|>", "<|assistant|>", "<|observation|>"]  # fmt: skip


# Qwen2's pre-tokenizer: GLM-4's with single digits (transformers rebuilds Qwen2 tokenizers
# from vocab and merges with this pattern and NFC, whatever tokenizer.json says).
QWEN2_PATTERN = GLM4_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")


def trained_backend(
    specials: list[str], bos: str | None = None, pattern: str = GLM4_PATTERN, nfc: bool = False
) -> Tokenizer:
    backend = Tokenizer(models.BPE())
    if nfc:
        backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS * 10, trainer=trainer)
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    backend.decoder = decoders.ByteLevel()
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))]
        )
    return backend


def write_checkpoint(
    folder: Path, backend: Tokenizer, config: dict, tokenizer_config: dict
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


def test_qwen_and_llama_style_checkpoints(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    )
    qwen_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    qwen_backend = trained_backend(qwen_specials, pattern=QWEN2_PATTERN, nfc=True)
    qwen = write_checkpoint(
        tmp_path / "qwen",
        qwen_backend,
        {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "eos_token_id": 601},
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "chat_template": template},
    )
    tok = load_tokenizer(str(qwen))
    for text in SAMPLE_TEXTS:
        assert tok.encode(text) == qwen_backend.encode(text).ids, repr(text)
        assert tok.decode(tok.encode(text)) == text
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n"
    assert stop_token_ids(tok, qwen) == [601, tok.convert_tokens_to_ids("<|im_end|>")]

    llama_backend = trained_backend(["<|begin_of_text|>", "<|eot_id|>"], bos="<|begin_of_text|>")
    llama = write_checkpoint(
        tmp_path / "llama",
        llama_backend,
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>"},
    )
    bos, eot = (
        llama_backend.token_to_id("<|begin_of_text|>"),
        llama_backend.token_to_id("<|eot_id|>"),
    )
    (llama / "generation_config.json").write_text(json.dumps({"eos_token_id": [eot, bos]}))
    tok = load_tokenizer(llama)
    assert tok.encode("Hello world") == [bos, *llama_backend.encode("Hello world").ids[1:]]
    assert tok.encode("Hello world", add_special_tokens=False) == tok.encode("Hello world")[1:]
    assert tok.chat_template is None  # not a GLM vocabulary: no template is invented
    assert stop_token_ids(tok, llama) == [eot, bos]


def test_glm_hf_checkpoint_without_template_gets_builtin(tmp_path: Path) -> None:
    folder = write_checkpoint(
        tmp_path / "glm-4-9b-chat-hf",
        trained_backend(GLM_SPECIALS),
        {"model_type": "glm", "architectures": ["GlmForCausalLM"]},
        {"tokenizer_class": "PreTrainedTokenizer", "eos_token": "<|endoftext|>"},
    )
    tok = load_tokenizer(folder)
    assert tok.chat_template == GLM4_CHAT_TEMPLATE
    ids = {s: tok.convert_tokens_to_ids(s) for s in GLM_SPECIALS}
    assert stop_token_ids(tok, folder) == [
        ids["<|endoftext|>"],
        ids["<|user|>"],
        ids["<|observation|>"],
    ]


MALICIOUS = (
    'import pathlib\npathlib.Path({marker!r}).write_text("ran")\nraise RuntimeError("ran")\n'
)


def plant_remote_code(folder: Path, marker: Path) -> None:
    for name in ("tokenization_chatglm.py", "configuration_chatglm.py", "modeling_chatglm.py"):
        (folder / name).write_text(MALICIOUS.format(marker=str(marker)))
    config = {
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        },
    }
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("layout", ["tokenizer.json", "tiktoken", "sentencepiece"])
def test_remote_code_is_never_executed(tmp_path: Path, layout: str) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    marker = tmp_path / "remote_code_ran"
    if layout == "tokenizer.json":
        trained_backend(GLM_SPECIALS).save(str(folder / "tokenizer.json"))
    elif layout == "tiktoken":
        write_tiktoken_file(folder / "tokenizer.model", {bytes([b]): b for b in range(256)})
    else:
        train_spm_model(folder / "tokenizer.model", vocab_size=400)
    tokenizer_config = {
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
        "eos_token": "<|endoftext|>" if layout != "sentencepiece" else "</s>",
        "chat_template": "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    plant_remote_code(folder, marker)

    tok = load_tokenizer(folder)
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<|user|>\nhi"
    assert tok.decode(tok.encode("hello there", add_special_tokens=False)) == "hello there"
    assert not marker.exists()
    assert not [name for name in sys.modules if name.split(".")[-1].endswith("_chatglm")]
    if layout == "tokenizer.json":
        assert isinstance(tok, PreTrainedTokenizerFast)


@pytest.mark.parametrize("remote", [False, True])
def test_chat_template_jinja_file_wins(tmp_path: Path, remote: bool) -> None:
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": "config"}
    if remote:
        tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_x.XTokenizer", None]}
    folder = write_checkpoint(
        tmp_path / "c", trained_backend(GLM_SPECIALS), {"model_type": "glm4"}, tokenizer_config
    )
    messages = [{"role": "user", "content": "hi"}]
    assert load_tokenizer(folder).apply_chat_template(messages, tokenize=False) == "config"
    (folder / "chat_template.jinja").write_text("from file")
    assert load_tokenizer(folder).apply_chat_template(messages, tokenize=False) == "from file"


def test_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer found"):
        load_tokenizer(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_tokenizer(bad)
