"""Structured output under tensor parallelism (CPU, gloo): rank 0 fills and applies the grammar's
bitmask while the other ranks only run the forward; the outputs follow the grammar and the free
rows beside them equal one rank's."""

from __future__ import annotations

import re

from flatout import LLM, SamplingParams
from flatout.demo import demo_model_path
from flatout.sampling_params import StructuredOutputsParams

PROMPTS = ["The quick brown fox", "Hello there"]
PATTERN = r"(yes|no)-[0-9]{3}"
FREE = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _run(tp: int) -> tuple[list[list[int]], list[str]]:
    llm = LLM(str(demo_model_path()), tensor_parallel_size=tp, max_model_len=128,
              num_kv_blocks=64)
    try:
        guided = SamplingParams(temperature=1.0, seed=5, max_tokens=12, n=2,
                                structured_outputs=StructuredOutputsParams(regex=PATTERN))
        outs = llm.generate(PROMPTS * 2, [FREE, FREE, guided, guided])
    finally:
        llm.engine.core.shutdown()
    return ([o.outputs[0].token_ids for o in outs[:2]],
            [c.text for o in outs[2:] for c in o.outputs])


def test_tp_structured_output() -> None:
    free_1, texts_1 = _run(1)
    free_2, texts_2 = _run(2)
    assert free_2 == free_1 and texts_2 == texts_1  # rank 0 samples, same generators
    for text in texts_1 + texts_2:
        assert re.fullmatch(PATTERN, text), text
