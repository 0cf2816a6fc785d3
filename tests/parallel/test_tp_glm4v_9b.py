"""GLM-4V-9B under tensor parallelism on CPU (gloo, 2 ranks): the EVA tower's blocks and the
adapter's gated MLP split over the ranks, every rank's image rows placed over its own text
embedding; greedy tokens and logprobs with images equal one rank's, and the reference's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatout import LLM, SamplingParams
from tests.engine.test_glm4v_9b_engine import image, mm, prompt
from tests.models.glm4v_9b_reference import DenseGLM4V9B, make_tiny_glm4v_9b_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=2)
CASES = [(1, [10]), (2, []), (3, [11, 12])]


def _run(path: Path, tp: int) -> tuple[list, int]:
    llm = LLM(str(path), tensor_parallel_size=tp, block_size=4, max_num_batched_tokens=16,
              num_kv_blocks=64)
    try:
        runner = llm.engine.core.runner
        outs = llm.generate([mm(prompt(len(imgs), seed), [image(s) for s in imgs])
                             for seed, imgs in CASES], GREEDY)
        encoded = runner.num_encoded_images
        # the tower's output sits where the text embedding is (a device of its own rank)
        embed = runner.model.model.embed_tokens.weight
        assert all(o.device == embed.device for o in runner.encoder_outputs.values())
    finally:
        llm.shutdown()
    return [o.outputs[0] for o in outs], encoded


def test_tp2_equals_one_rank_and_the_reference(tmp_path: Path) -> None:
    path, sd = make_tiny_glm4v_9b_checkpoint(tmp_path / "glm-4v-9b")
    ref = DenseGLM4V9B(path, sd)
    want = [ref.greedy(prompt(len(imgs), seed), [image(s) for s in imgs], 8)
            for seed, imgs in CASES]
    one, encoded_one = _run(path, 1)
    two, encoded_two = _run(path, 2)
    assert [o.token_ids for o in one] == want
    assert [o.token_ids for o in two] == want
    assert encoded_one == encoded_two == 3
    for a, b in zip(one, two, strict=True):
        assert [lp.logprob for lp in a.logprobs] == pytest.approx(
            [lp.logprob for lp in b.logprobs], abs=1e-4)


def test_image_rows_move_to_the_embedding_dtype(tmp_path: Path) -> None:
    """Rows from a tower in another dtype (or on another device) are moved to the text
    embedding's before they are placed: the same logits as rows already there."""
    from flatout.layers.attention import AttentionMetadata, forward_context
    from flatout.models.registry import load_model, resolve_model_config

    path, _ = make_tiny_glm4v_9b_checkpoint(tmp_path / "glm-4v-9b")
    model = load_model(resolve_model_config(str(path)), torch.device("cpu"))
    ids = torch.tensor([5, 6, 290, 0, 0, 0, 0, 291, 9])
    pos = torch.tensor([0, 1, 2, 3, 3, 3, 3, 4, 5])
    with torch.no_grad():
        rows = model.encode_images(torch.randn(1, 3, 56, 56))[0]
        with forward_context(AttentionMetadata.for_prefill_without_cache([len(ids)])):
            same = model(ids, pos, rows, torch.arange(2, 8))
        with forward_context(AttentionMetadata.for_prefill_without_cache([len(ids)])):
            other = model(ids, pos, rows.double(), torch.arange(2, 8))
    assert same.dtype == other.dtype == torch.float32
    torch.testing.assert_close(same, other)
