"""The built-in vision demo (`--model demo-vl`): made on first use, the same bytes every time, a
real GLM-4.1V checkpoint (transformers loads it and generates the same tokens from an image)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from flatout import LLM, SamplingParams
from flatout.demo_vl import IMAGE_TOKENS, write_demo_vl_checkpoint


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_demo_vl_is_deterministic(tmp_path: Path) -> None:
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        write_demo_vl_checkpoint(tmp_path / d)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


@torch.no_grad()
def test_demo_vl_answers_an_image_as_transformers_does(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLATOUT_CACHE", str(tmp_path))
    llm = LLM("demo-vl")
    path = Path(llm.engine.model_config.tokenizer or "")
    assert path.parent == tmp_path and llm.engine.inputs.image_placeholder == "".join(IMAGE_TOKENS)
    image = np.random.default_rng(0).integers(0, 256, (112, 168, 3), dtype=np.uint8)
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    out = llm.chat([{"role": "user", "content": [{"type": "image", "image": image},
                                                  {"type": "text", "text": "What is this?"}]}],
                   greedy)[0]
    ids = out.prompt_token_ids
    ref = transformers.Glm4vForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    pixels = transformers.Glm4vImageProcessorPil()(images=[image], return_tensors="pt")
    img_id = IMAGE_TOKENS["<|image|>"]
    gen = ref.eval().generate(
        input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
        pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"],
        mm_token_type_ids=(torch.tensor([ids]) == img_id).int(), max_new_tokens=8,
        min_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.outputs[0].token_ids == gen[0, len(ids):].tolist()
    assert ids.count(img_id) == 112 * 168 // 28**2
