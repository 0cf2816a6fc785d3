"""Tensor parallelism on CPU with gloo: 2 and 4 ranks (worker processes) give the greedy output
of one rank, for every architecture, through the offline API."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch.distributed as dist

from flatout import LLM, SamplingParams, distributed
from flatout.models.registry import resolve_model_config
from flatout.worker.parallel import WORKER_LOST_EXIT_CODE, check_tensor_parallel
from tests.helpers.tiny_checkpoints import ARCHITECTURES, make_tiny_checkpoint

PROMPTS = [[5, 17, 42, 99, 7, 3], list(range(10, 90)), [200, 201], [9] * 33]
# chunked prefill (80-token prompt over a 32-token budget), mixed prefill + decode steps
ENGINE = {"max_model_len": 256, "max_num_batched_tokens": 32, "num_kv_blocks": 64}
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
SEEDED = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)


def _run(path: Path, tp: int, **engine: object) -> tuple[list, list, LLM, list]:
    """Greedy and seeded outputs, the (shut down) LLM and its attention layers."""
    llm = LLM(str(path), tensor_parallel_size=tp, **{**ENGINE, **engine})
    try:
        greedy = llm.generate(PROMPTS, GREEDY)
        seeded = llm.generate(PROMPTS[:2], SEEDED)
        attn_layers = llm.engine.core.runner.attn_layers  # the runner goes with shutdown
    finally:
        llm.shutdown()
    return ([o.outputs[0] for o in greedy], [o.outputs[0].token_ids for o in seeded], llm,
            attn_layers)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def reference(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, list, list]]:
    arch = request.param
    path = make_tiny_checkpoint(arch, tmp_path_factory.mktemp(arch.lower()))
    greedy, seeded, _, _ = _run(path, 1)
    yield path, greedy, seeded


def _assert_same(got: list, want: list) -> None:
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for g, w in zip(got, want, strict=True):  # the sampled tokens' logprobs, from all ranks
        assert [lp.logprob for lp in g.logprobs] == pytest.approx(
            [lp.logprob for lp in w.logprobs], abs=1e-4
        )


@pytest.mark.parametrize("tp", [2, 4])
def test_tp_matches_one_rank(reference: tuple[Path, list, list], tp: int) -> None:
    path, greedy, seeded = reference
    got_greedy, got_seeded, llm, _ = _run(path, tp)
    _assert_same(got_greedy, greedy)
    assert got_seeded == seeded  # only rank 0 samples, with the same generators
    procs = llm.engine.core.tp_group.procs
    assert len(procs) == tp - 1 and all(p.poll() == 0 for p in procs)  # workers exited cleanly
    assert not dist.is_initialized() and distributed.get_tp_size() == 1


def test_gqa_with_more_ranks_than_kv_heads(tmp_path: Path) -> None:
    """One KV head (GLM-4-9B has 2 over 32 heads): each rank holds a replica of it."""
    path = make_tiny_checkpoint("GlmForCausalLM", tmp_path / "mqa", num_key_value_heads=1)
    want, _, _, _ = _run(path, 1)
    for tp in (2, 4):
        got, _, _, attn_layers = _run(path, tp)
        _assert_same(got, want)
        assert {a.num_kv_heads for a in attn_layers} == {1}


def test_preemption_and_prefix_cache_under_tp(tmp_path: Path) -> None:
    """A KV cache too small for the batch: preempted sequences come back with new block
    tables (the workers are sent the whole table again) and still match one rank."""
    path = make_tiny_checkpoint("Qwen3ForCausalLM", tmp_path / "q3")
    tight = {"num_kv_blocks": 12, "block_size": 16}
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [list(range(3 + i, 50 + i)) for i in range(4)] + [list(range(3, 50))]
    outs = []
    for tp in (1, 2):
        llm = LLM(str(path), tensor_parallel_size=tp, **{**ENGINE, **tight})
        try:
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
            assert llm.engine.scheduler.num_preemptions > 0
        finally:
            llm.engine.core.shutdown()
    assert outs[0] == outs[1]


def test_head_counts_that_do_not_split_are_refused(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "six", num_attention_heads=6,
                                hidden_size=96, num_key_value_heads=3)
    cfg = resolve_model_config(str(path))
    check_tensor_parallel(cfg, 3)
    with pytest.raises(ValueError, match=r"6 attention heads do not split evenly over 4") as e:
        check_tensor_parallel(cfg, 4)
    assert "3 KV heads" in str(e.value) and "Sizes that work: 1" in str(e.value)
    with pytest.raises(ValueError, match="does not fit LlamaForCausalLM"):
        LLM(str(path), tensor_parallel_size=2)  # refused before any process starts
    assert not dist.is_initialized()


def test_shutdown_is_idempotent_and_reaps_workers(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "l")
    llm = LLM(str(path), tensor_parallel_size=2, **ENGINE)
    procs = llm.engine.core.tp_group.procs
    llm.engine.core.shutdown()
    llm.engine.core.shutdown()
    assert [p.wait(timeout=10) for p in procs] == [0]


def test_two_nodes_through_env_rendezvous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TP = 4 as two 'nodes' on this host: the head (ranks 0, 1) and a node started by
    `python -m flatout.worker.tp_worker --nnodes 2 --node-rank 1` (ranks 2, 3)."""
    import sys

    path = make_tiny_checkpoint("Glm4ForCausalLM", tmp_path / "g4")
    want, _, _, _ = _run(path, 1)
    port = distributed.free_port()
    monkeypatch.setenv("FLATOUT_NNODES", "2")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    node1 = subprocess.Popen(
        [sys.executable, "-m", "flatout.worker.tp_worker", "--nnodes", "2", "--node-rank", "1",
         "--master-addr", "127.0.0.1", "--master-port", str(port), "--model", str(path),
         "--tensor-parallel-size", "4", "--max-model-len", "256"],
    )
    try:
        got, _, llm, _ = _run(path, 4)
        assert len(llm.engine.core.tp_group.procs) == 1  # only rank 1 is local to the head
        assert node1.wait(timeout=30) == 0
    finally:
        if node1.poll() is None:
            node1.kill()
    _assert_same(got, want)


_KILL_A_RANK = """
import sys, time
from flatout import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, max_model_len=128, num_kv_blocks=32)
print(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids,
      flush=True)
llm.engine.core.tp_group.procs[0].kill()
time.sleep(10)
print("still here", flush=True)
"""


def test_a_dead_rank_ends_the_engine_process_instead_of_hanging(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "llama")
    proc = subprocess.run([sys.executable, "-c", _KILL_A_RANK, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == WORKER_LOST_EXIT_CODE, proc.stderr[-2000:]
    assert "still here" not in proc.stdout
    assert "rank 1 exited" in proc.stderr


def test_tp_with_fp8_kv_cache_matches_one_rank(tmp_path: Path) -> None:
    """Each rank quantizes its own KV heads with the (replicated) per-layer scales: 2 ranks give
    one rank's fp8-cache output."""
    path = make_tiny_checkpoint("GlmForCausalLM", tmp_path / "glm")
    one, _, _, _ = _run(path, 1, kv_cache_dtype="fp8")
    two, _, _, attn_layers = _run(path, 2, kv_cache_dtype="fp8")
    assert attn_layers[0].k_cache.dtype.itemsize == 1
    _assert_same(two, one)
