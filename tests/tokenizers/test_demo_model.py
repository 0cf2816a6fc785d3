"""The built-in demo model: loads in transformers, renders chats, is created deterministically."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from flatout.assets.demo.build_tokenizer import tokenizer_config, train_demo_tokenizer
from flatout.demo import ASSETS, STOP_TOKEN_IDS, demo_model_path, write_demo_checkpoint
from flatout.tokenizers import load_tokenizer, stop_token_ids
from flatout.tokenizers.templates import DEMO_CHAT_TEMPLATE
from tests.tokenizers.tokenizer_fixtures import SAMPLE_TEXTS

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "<think>The user greets me.</think>\nHi, how can I help?"},
    {"role": "user", "content": "讲个故事"},
]


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLATOUT_CACHE", str(cache))
        path = demo_model_path()
    assert Path(path) == cache / "demo-v1"
    return path


def test_demo_loads_in_transformers(demo_path: str) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(demo_path, output_loading_info=True)
    assert type(model).__name__ == "Glm4ForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"]
    config = model.config
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (128, 2, 32)
    assert config.num_key_value_heads == 2 and config.attention_bias
    assert config.rope_parameters["partial_rotary_factor"] == 0.5
    tok = AutoTokenizer.from_pretrained(demo_path)
    ids = tok(["The server reads", "大语言模型"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**ids).logits[:, -1]
    # The weights are scaled so that greedy decoding has clear winners (robust comparisons).
    top2 = logits.topk(2).values
    assert torch.all(top2[:, 0] - top2[:, 1] > 1e-3) and logits.std() > 1.0


def test_demo_tokenizer_through_load_tokenizer(demo_path: str) -> None:
    tok = load_tokenizer(demo_path)
    backend = Tokenizer.from_file(str(Path(demo_path) / "tokenizer.json"))
    assert len(tok) == 4096
    for text in SAMPLE_TEXTS:
        assert tok.encode(text) == backend.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
    specials = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>",
                "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>"]  # fmt: skip
    assert tok.convert_tokens_to_ids(specials) == list(range(4084, 4096))
    assert stop_token_ids(tok, demo_path) == STOP_TOKEN_IDS == [4084, 4091, 4093]
    generation_config = json.loads((Path(demo_path) / "generation_config.json").read_text())
    assert generation_config["eos_token_id"] == STOP_TOKEN_IDS
    # <think> tags stay visible when special tokens are skipped (reasoning parsers need them).
    ids = tok.encode("<|assistant|><think>a</think>b", add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == "<think>a</think>b"


def test_demo_chat_template(demo_path: str) -> None:
    tok = load_tokenizer(demo_path)
    rendered = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    # thinking is opt-in for the demo: a plain request answers in `content`
    assert rendered == (
        "[gMASK]<sop><|system|>\nYou are a helpful assistant.<|user|>\nHello!"
        "<|assistant|>\nHi, how can I help?<|user|>\n讲个故事<|assistant|>\n"
    )
    for off in (False, None):
        no_think = tok.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=off
        )
        assert no_think == rendered
    think = tok.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert think == rendered + "<think>"
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True,
                                  enable_thinking=True)["input_ids"]
    newline = tok.convert_tokens_to_ids("\u010a")  # byte-level "\n"
    assert ids[:3] == [4086, 4088, 4090] and ids[-3:] == [4092, newline, 4094]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    with_tools = tok.apply_chat_template(MESSAGES[1:2], tools=tools, tokenize=False)
    assert with_tools.startswith("[gMASK]<sop><|system|>\n# 可用工具\n\n## get_weather\n\n{")
    assert with_tools.endswith("<|user|>\nHello!")


def test_demo_creation_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    write_demo_checkpoint(first)
    write_demo_checkpoint(second)
    names = sorted(os.listdir(first))
    assert names == sorted(os.listdir(second))
    assert "model.safetensors" in names and "config.json" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_concurrent_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLATOUT_CACHE", str(tmp_path))
    with ThreadPoolExecutor(max_workers=4) as pool:
        paths = list(pool.map(lambda _: demo_model_path(), range(4)))
    assert paths == [str(tmp_path / "demo-v1")] * 4
    assert os.listdir(tmp_path) == ["demo-v1"]  # no staging folder left behind
    reference = tmp_path / "ref"
    reference.mkdir()
    write_demo_checkpoint(reference)
    for name in os.listdir(reference):
        assert (tmp_path / "demo-v1" / name).read_bytes() == (reference / name).read_bytes()


def test_shipped_tokenizer_is_reproducible() -> None:
    shipped = json.loads((ASSETS / "tokenizer.json").read_text(encoding="utf-8"))
    retrained = json.loads(train_demo_tokenizer().to_str())
    assert retrained["model"]["vocab"] == shipped["model"]["vocab"]
    assert retrained["model"]["merges"] == shipped["model"]["merges"]
    assert retrained["added_tokens"] == shipped["added_tokens"]
    assert json.loads((ASSETS / "tokenizer_config.json").read_text()) == tokenizer_config()
    assert (ASSETS / "chat_template.jinja").read_text(encoding="utf-8") == DEMO_CHAT_TEMPLATE
    shipped_bytes = sum(path.stat().st_size for path in ASSETS.iterdir() if path.is_file())
    assert shipped_bytes < 1_000_000
