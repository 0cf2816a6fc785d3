"""Structured output through the offline engine on the demo model: grammar rows beside free rows
in one batch (the free rows' tokens unchanged), n > 1, the compile cache, compile failures naming
the field, aborts while compiling, a grammar that starts after a token (a reasoning model's
</think>), and the grammar's end stopping the output even with ignore_eos."""

from __future__ import annotations

import re

import pytest

from flatout import LLM, SamplingParams
from flatout.engine.messages import EngineCoreRequest, RequestFieldError
from flatout.sampling_params import SamplingParamsError
from flatout.sampling_params import StructuredOutputsParams as SO

PROMPTS = ["The quick brown fox", "Hello there", "你好，世界"]
PATTERN = r"[a-c]{2}-[0-9]{2}"


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_num_seqs=16, num_kv_blocks=256)


def _assert_clean(llm: LLM) -> None:
    bm = llm.engine.block_manager
    bm.check_integrity()
    assert bm.num_used_blocks == 0 and not llm.engine.core.has_unfinished()
    assert not llm.engine.core._seq_grammars


def test_grammar_rows_beside_free_rows(llm: LLM) -> None:
    free = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, free)]
    guided = SamplingParams(temperature=1.0, seed=3, max_tokens=12, n=2,
                            structured_outputs=SO(regex=PATTERN))
    outs = llm.generate(PROMPTS * 2, [free] * 3 + [guided] * 3)
    assert [o.outputs[0].token_ids for o in outs[:3]] == alone
    for o in outs[3:]:
        for c in o.outputs:
            assert re.fullmatch(PATTERN, c.text) and c.finish_reason == "stop", c.text
    _assert_clean(llm)


def test_choice_with_n_and_the_compile_cache(llm: LLM) -> None:
    so = SO(choice=["red", "green", "blue sky"])
    outs = llm.generate(PROMPTS[:1], SamplingParams(temperature=1.0, max_tokens=8, n=6, seed=1,
                                                    structured_outputs=so))
    assert {c.text for c in outs[0].outputs} <= {"red", "green", "blue sky"}
    grammars = llm.engine.core.grammars
    assert grammars.submit(SO(choice=["red", "green", "blue sky"])) is grammars.submit(so)
    assert grammars.submit(SO(choice=["red"])) is not grammars.submit(so)


def test_a_grammar_that_does_not_compile_names_its_field(llm: LLM) -> None:
    bad = SamplingParams(max_tokens=4, structured_outputs=SO(grammar="root ::= nowhere",
                                                             field="guided_grammar"))
    with pytest.raises(RequestFieldError) as e:
        llm.generate(PROMPTS[:2], [SamplingParams(max_tokens=4), bad])
    assert e.value.field == "guided_grammar" and "nowhere" in str(e.value)
    _assert_clean(llm)
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4,
                                                   structured_outputs=SO(regex="ok")))
    assert out[0].outputs[0].text == "ok"


def test_abort_while_compiling(llm: LLM) -> None:
    core = llm.engine.core
    schema = {"type": "object", "properties": {"unique_abort_key": {"type": "boolean"}}}
    params = SamplingParams(max_tokens=4, structured_outputs=SO(json=schema))
    core.add_request(EngineCoreRequest("compiling", [1, 2, 3], params, 4))
    core.abort("compiling")
    assert not core.has_unfinished()
    while core.grammars.submit(params.structured_outputs).running():  # type: ignore[arg-type]
        pass
    assert core.step() == [] and not core.has_unfinished()
    _assert_clean(llm)


def test_grammar_after_a_token_and_its_end_stops_even_with_ignore_eos(llm: LLM) -> None:
    think_end = 4095  # the demo tokenizer's </think>: forced by the bias, free before the grammar
    so = SO(choice=["alpha", "beta"], after_token_id=think_end)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                            logit_bias={think_end: 100.0}, skip_special_tokens=False,
                            structured_outputs=so)
    c = llm.generate(PROMPTS[:1], params)[0].outputs[0]
    assert c.token_ids[0] == think_end and c.finish_reason == "stop"
    assert c.text.removeprefix("</think>") in ("alpha", "beta"), c.text


def test_structured_outputs_params_are_validated() -> None:
    with pytest.raises(SamplingParamsError, match="exactly one"):
        SO(regex="a", choice=["b"])
    with pytest.raises(SamplingParamsError, match="exactly one"):
        SO()
    with pytest.raises(SamplingParamsError, match="choice"):
        SO(choice=["a", ""])
    with pytest.raises(SamplingParamsError, match="not JSON") as e:
        SO(json="{oops", field="guided_json")
    assert e.value.field == "guided_json"
    with pytest.raises(SamplingParamsError) as e2:
        SamplingParams(min_tokens=2, structured_outputs=SO(regex="a+"))
    assert e2.value.field == "min_tokens"
    assert SO(json='{"type": "object"}').spec == SO(json={"type": "object"}).spec
