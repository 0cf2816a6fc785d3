"""The engine launches step N+1 before it reads step N's tokens back: sequences run with a
pending token, penalties still count it, stops drop the extra token, nothing leaks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatout import LLM, SamplingParams
from flatout.engine.messages import EngineCoreRequest
from tests.helpers.tiny_checkpoints import load_hf_reference, make_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:  # noqa: ANN001
    return make_tiny_checkpoint("Glm4ForCausalLM", tmp_path_factory.mktemp("glm4"))


@pytest.fixture(scope="module")
def llm(checkpoint: Path) -> LLM:
    return LLM(str(checkpoint), device="cpu", block_size=4, max_num_seqs=8,
               enable_prefix_caching=True)


def reference_penalised_greedy(hf, prompt: list[int], params: SamplingParams) -> list[int]:  # noqa: ANN001
    """Greedy decoding with the penalties applied to the full history, one token at a time."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(params.max_tokens or 0):
            logits = hf(torch.tensor([prompt + out])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long),
                                    minlength=logits.shape[0]).float()
            seen = counts > 0
            seen[torch.tensor(prompt)] = True
            rp = params.repetition_penalty
            logits = torch.where(seen, torch.where(logits > 0, logits / rp, logits * rp), logits)
            logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
            out.append(int(logits.argmax()))
    return out


def test_penalties_count_the_pending_token(llm: LLM, checkpoint: Path) -> None:
    hf = load_hf_reference(checkpoint)
    vocab = hf.config.vocab_size
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 13, 9)]
    penalised = [
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, frequency_penalty=1.5),
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True,
                       repetition_penalty=1.8, presence_penalty=0.9),
        SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True),
    ]
    outs = llm.generate(prompts, penalised)
    for prompt, params, out in zip(prompts, penalised, outs, strict=True):
        assert out.token_ids == reference_penalised_greedy(hf, prompt, params)
    # the penalties bite: without them the first row repeats itself
    assert len(set(outs[0].token_ids)) > len(set(reference_penalised_greedy(
        hf, prompts[0], SamplingParams(temperature=0.0, max_tokens=14))))


def test_step_returns_the_previous_steps_tokens(llm: LLM) -> None:
    core = llm.engine.core
    steps_before = core.stats.num_steps
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    core.add_request(EngineCoreRequest("overlap-a", [5, 6, 7, 8, 9], params, 3))
    assert core.step() == []  # the prefill is launched; nothing is read back yet
    (seq,) = core.seqs["overlap-a"]
    assert seq.num_pending_tokens == 1 and seq.num_output_tokens == 0
    first = core.step()  # launches the decode that reads the pending token on the device
    assert [o.new_token_ids for o in first] == [seq.output_token_ids]
    outs = []
    while core.has_unfinished():
        outs += core.step()
    assert outs[-1].finish_reason == "length" and seq.num_output_tokens == 3
    # max_tokens=3: one prefill and two decodes; no step is launched past the last token
    assert core.stats.num_steps - steps_before == 3
    core.step()  # drains nothing: no step is left in flight
    core.block_manager.check_integrity()
    assert core.block_manager.num_used_blocks == 0


def test_a_stop_drops_the_token_computed_after_it(llm: LLM) -> None:
    free = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompt = [11, 12, 13, 14, 15, 16]
    tokens = llm.generate([prompt], free)[0].token_ids
    stop_at = tokens[3]
    index = tokens.index(stop_at)
    stopped = llm.generate(
        [prompt], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True,
                                 stop_token_ids=[stop_at]))[0]
    assert stopped.token_ids == tokens[: index + 1] and stopped.finish_reason == "stop"
    core = llm.engine.core
    core.block_manager.check_integrity()
    assert core.block_manager.num_used_blocks == 0


def test_a_block_filled_by_a_pending_token_is_cached(llm: LLM) -> None:
    core = llm.engine.core
    core.block_manager.reset_prefix_cache()
    prompt = [21, 22, 23, 24, 25, 26]  # block size 4: generated tokens fill blocks 2 and 3
    params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    hit_before = core.block_manager.num_hit_tokens
    again = llm.generate([prompt + out.token_ids],
                         SamplingParams(temperature=0.0, max_tokens=1))[0]
    assert core.block_manager.num_hit_tokens - hit_before == 12  # 13 tokens: 3 full blocks
    assert again.num_cached_tokens == 12


def test_min_tokens_counts_the_pending_token(llm: LLM) -> None:
    """Stop ids are banned for exactly min_tokens outputs, though the last one is pending when
    the next is sampled: the stop id may end the output at index min_tokens, not later."""
    prompt = [31, 32, 33, 34, 35]
    free = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12,
                                                 ignore_eos=True))[0].token_ids
    m = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                stop_token_ids=[free[m]], min_tokens=m))[0]
    assert out.token_ids == free[: m + 1] and out.finish_reason == "stop"
