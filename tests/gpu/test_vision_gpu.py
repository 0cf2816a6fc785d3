"""GLM-4.1V on the GPU: the engine (preprocessing and the tower on the device, CUDA graphs for
decode, chunked prefill splitting images) matches transformers' CPU generate token for token on
a tiny fp32 checkpoint; the real-shaped preset (dummy bf16 weights) serves a 1080x2400
screenshot with the KV cache sized around the tower's profiled peak. Skipped without CUDA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flatout import LLM, SamplingParams
from tests.engine.test_vision_engine import CASES, GREEDY, case_prompts, hf_generate, image, prompt
from tests.engine.test_vision_engine import SIZES as TINY_SIZES
from tests.helpers.tiny_checkpoints import make_tiny_glm4v_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("eager", [False, True])
def test_greedy_matches_transformers_on_gpu(tmp_path: Path, eager: bool) -> None:
    import transformers

    ckpt = make_tiny_glm4v_checkpoint(tmp_path / "glm4v")
    ref = transformers.Glm4vForConditionalGeneration.from_pretrained(
        ckpt, dtype=torch.float32, attn_implementation="eager").eval()
    expected = [hf_generate(ref, prompt(len(imgs), seed),
                            [image(TINY_SIZES[i], s) for i, s in imgs]) for seed, imgs in CASES]
    llm = LLM(str(ckpt), dtype="float32", block_size=16, max_num_batched_tokens=16,
              enforce_eager=eager)
    outs = llm.generate(case_prompts(), GREEDY)
    assert [o.outputs[0].token_ids for o in outs] == expected
    again = llm.generate(case_prompts(), GREEDY)  # prefix hits on the same images
    assert [o.outputs[0].token_ids for o in again] == expected
    assert llm.engine.core.scheduler.encoder_cache.num_used == 0


def test_screenshot_on_the_real_shapes() -> None:
    llm = LLM("glm-4.1v-9b-thinking", load_format="dummy", max_model_len=8192)
    llm.engine.inputs.max_pixels = 5_000_000
    vc = llm.engine.model_config.vision
    assert vc is not None
    shot = np.random.default_rng(0).integers(0, 256, (2400, 1080, 3), dtype=np.uint8)
    ids = [100, 200, vc.image_start_token_id, vc.image_token_id, vc.image_end_token_id, 300]
    out = llm.generate({"prompt": ids, "multi_modal_data": {"image": shot}},
                       SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert len(out.prompt_token_ids) == len(ids) - 1 + 3108  # grid 168 x 74
    assert len(out.outputs[0].token_ids) == 8
