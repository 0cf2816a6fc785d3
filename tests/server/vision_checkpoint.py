"""A tiny random GLM-4.1V checkpoint the server can load: the demo's trained tokenizer and chat
template plus GLM-4.1V's three image tokens (<|begin_of_image|>, <|image|>, <|end_of_image|>
at ids 4096-4098), and a tiny Glm4vForConditionalGeneration saved by transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedTokenizerFast

from flatout.demo import ASSETS, STOP_TOKEN_IDS
from tests.helpers.tiny_checkpoints import _randomize

IMAGE_TOKENS = ["<|begin_of_image|>", "<|image|>", "<|end_of_image|>"]
BOI_ID, IMAGE_ID, EOI_ID = 4096, 4097, 4098


def make_vision_server_checkpoint(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast.from_pretrained(str(ASSETS))
    tok.add_special_tokens({"additional_special_tokens": IMAGE_TOKENS})
    assert tok.convert_tokens_to_ids(IMAGE_TOKENS) == [BOI_ID, IMAGE_ID, EOI_ID]
    tok.save_pretrained(path)
    cfg = transformers.Glm4vConfig(
        text_config={
            "vocab_size": 4104, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "attention_bias": True,
            "pad_token_id": STOP_TOKEN_IDS[0], "eos_token_id": STOP_TOKEN_IDS,
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1],
                                "partial_rotary_factor": 0.5, "rope_theta": 10000.0},
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "num_heads": 2, "out_hidden_size": 64,
            "intermediate_size": 96, "image_size": 56, "patch_size": 14, "rms_norm_eps": 1e-6,
        },
        image_start_token_id=BOI_ID, image_token_id=IMAGE_ID, image_end_token_id=EOI_ID,
        video_start_token_id=4099, video_end_token_id=4100, video_token_id=4101,
    )
    torch.manual_seed(seed)
    model = transformers.Glm4vForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    model.save_pretrained(path)
    gen = {"eos_token_id": STOP_TOKEN_IDS, "pad_token_id": STOP_TOKEN_IDS[0]}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return path
