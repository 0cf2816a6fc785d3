"""`flatout serve` on a tiny ChatGLM-6B v1 checkpoint with its ice_text.model tokenizer: a
streamed chat reply equals the dense reference's tokens, and a prompt of token ids without
[gMASK] / <sop> is a 400 naming what it lacks."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import sentencepiece as spm

from flatout.tokenizers import load_tokenizer
from tests.models.chatglm_v1_reference import (
    DenseChatGLMv1,
    make_tiny_v1_checkpoint,
    train_ice_text,
)
from tests.server.server_process import ServerProcess


def test_streamed_chat_and_bad_prompts(tmp_path: Path) -> None:
    model = train_ice_text(tmp_path / "ice_text.model")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    ids = {t: sp.piece_to_id(t) for t in ("[MASK]", "[gMASK]", "<sop>", "<eop>", "<pad>")}
    path = make_tiny_v1_checkpoint(
        tmp_path / "chatglm-6b", vocab_size=sp.get_piece_size(), mask_token_id=ids["[MASK]"],
        gmask_token_id=ids["[gMASK]"], bos_token_id=ids["<sop>"], eos_token_id=ids["<eop>"],
        pad_token_id=ids["<pad>"],
    )
    (path / "ice_text.model").write_bytes(model.read_bytes())
    (path / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 0}))
    server = ServerProcess(["--model", str(path), "--num-kv-blocks", "64"], tmp_path / "log",
                           wait=False)
    try:
        tok = load_tokenizer(path)
        messages = [{"role": "user", "content": "今天天气怎么样？"}]
        prompt = tok.encode(tok.apply_chat_template(messages, tokenize=False,
                                                    add_generation_prompt=True),
                            add_special_tokens=False)
        expected = tok.decode(DenseChatGLMv1(path).greedy(prompt, 8), skip_special_tokens=True)
        server.wait()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0)
        stream = client.chat.completions.create(
            model="chatglm-6b", messages=messages, max_tokens=8, temperature=0, stream=True,
            extra_body={"ignore_eos": True})
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert expected and text == expected
        with pytest.raises(openai.BadRequestError, match="<sop>"):
            client.completions.create(model="chatglm-6b", prompt=[5, 6, ids["[gMASK]"]],
                                      max_tokens=2)
    finally:
        server.stop()
