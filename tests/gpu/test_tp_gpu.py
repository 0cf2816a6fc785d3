"""Tensor parallelism on several GPUs: the fused one-shot all-reduce + add + RMSNorm against NCCL
(eagerly, through both alternating buffers, and replayed in CUDA graphs), and the engine at TP = 2
(and 4) against one GPU. Run through the device tool on a multi-GPU kind; skipped otherwise."""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from pathlib import Path

import pytest
import torch

from flatout import LLM, SamplingParams
from tests.helpers.processes import child_pids
from tests.helpers.tiny_checkpoints import make_tiny_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def _check_fused(rank: int, world: int, dev: torch.device, dtype: torch.dtype,
                 hidden: int) -> None:  # fmt: skip
    import torch.distributed as dist

    from flatout.distributed.symm_reduce import SymmetricReduce
    from flatout.kernels.norm import fused_add_rms_norm

    sym = SymmetricReduce(256, hidden, dtype, dev)
    weight = torch.randn(hidden, dtype=dtype, device=dev,  # replicated: the same on every rank
                         generator=torch.Generator(device=dev).manual_seed(1))

    def inputs(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=dev).manual_seed(seed * 8 + rank)
        part = torch.randn(rows, hidden, dtype=dtype, device=dev, generator=g)
        g.manual_seed(seed)  # the residual is the same on every rank
        res = torch.randn(rows, hidden, dtype=dtype, device=dev, generator=g)
        return part, res

    def want(part: torch.Tensor, res: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The partials summed in rank order in fp32 and rounded (for 2 ranks: NCCL's bits;
        NCCL's ring rounds after every hop, so with 4 it is further off), then the add + norm
        kernel of one GPU."""
        parts = [torch.empty_like(part) for _ in range(world)]
        dist.all_gather(parts, part)
        total = parts[0].float()
        for p in parts[1:]:
            total += p.float()
        if world == 2:
            nccl = part.clone()
            dist.all_reduce(nccl)
            assert torch.equal(nccl, total.to(dtype))
        return fused_add_rms_norm(total.to(dtype), res, weight, 1e-6)

    def check(got: tuple, ref: tuple, what: str) -> None:
        for g, w in zip(got, ref, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=0, msg=lambda m: f"{what}: {m}")
        for t in got:  # every rank computed the same bits
            gathered = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(gathered, t)
            assert all(torch.equal(other, t) for other in gathered), what

    # eager, through both buffers, at every size a decode graph uses and beyond 128 rows
    for seed, rows in enumerate([1, 2, 3, 8, 32, 127, 128, 129, 200, 256, 1, 5]):
        part, res = inputs(rows, seed)
        slot = sym.next_partial(rows, hidden, dtype)
        assert slot is not None
        slot.partial.copy_(part)
        check(slot.add_rms_norm(res, weight, 1e-6), want(part, res), f"eager {rows}")
    assert sym.next_partial(257, hidden, dtype) is None  # too many rows: NCCL

    # a CUDA graph of many back-to-back calls, replayed with new data each time
    rows, calls = 24, 40
    srcs = torch.zeros(calls, rows, hidden, dtype=dtype, device=dev)
    res = torch.zeros(rows, hidden, dtype=dtype, device=dev)
    outs: list[torch.Tensor] = []
    sym.next = 0
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        r = res
        for k in range(calls):
            slot = sym.next_partial(rows, hidden, dtype)
            assert slot is not None
            slot.partial.copy_(srcs[k])
            y, r = slot.add_rms_norm(r, weight, 1e-6)
            outs.append(y)
    for replay in range(3):
        for k in range(calls):
            srcs[k].copy_(inputs(rows, 100 + replay * calls + k)[0])
        res.copy_(inputs(rows, 99 + replay)[1])
        graph.replay()
        r = res
        for k in range(calls):
            y, r = want(srcs[k], r)
            check((outs[k],), (y,), f"graph replay {replay} call {k}")
    torch.cuda.synchronize()
    dist.barrier()


def _fused_rank(rank: int, world: int, port: int, errors: mp.Queue) -> None:
    try:
        import torch.distributed as dist

        torch.cuda.set_device(rank)
        dev = torch.device("cuda", rank)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, device_id=dev)  # fmt: skip
        _check_fused(rank, world, dev, torch.bfloat16, 4096)
        _check_fused(rank, world, dev, torch.float32, 200)
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the test
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


@pytest.mark.parametrize("world", [2, 4])
def test_fused_all_reduce_matches_nccl(world: int) -> None:
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} CUDA devices")
    from flatout.distributed import free_port

    ctx = mp.get_context("spawn")
    errors: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_fused_rank, args=(r, world, port, errors)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    assert not hung, f"ranks {hung} hung (a barrier that never met)\n" + "\n".join(msgs)
    assert all(p.exitcode == 0 for p in procs), "\n".join(msgs)


PROMPTS = [[5, 17, 42, 99, 7, 3], list(range(10, 90)), [200, 201], [9] * 33, [3] * 300]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
ENGINE = {"max_model_len": 512, "max_num_batched_tokens": 1024, "dtype": "float32",
          "num_kv_blocks": 512}


def _engine_rank0(path: str, tp: int, engine: dict, results: mp.Queue) -> None:
    try:
        from flatout import distributed

        llm = LLM(path, tensor_parallel_size=tp, **{**ENGINE, **engine})
        outs = [o.outputs[0] for o in llm.generate(PROMPTS, GREEDY)]
        fused = distributed.symmetric_reduce() is not None
        llm.engine.core.shutdown()
        results.put(([o.token_ids for o in outs],
                     [[lp.logprob for lp in o.logprobs] for o in outs], fused))  # fmt: skip
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put(traceback.format_exc())
        raise


def _run(path: Path, tp: int, **engine: object) -> tuple[list, list, bool]:
    """One engine in a process of its own (a process hosts one NCCL group in its lifetime)."""
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_engine_rank0, args=(str(path), tp, engine, results))
    proc.start()
    try:
        got = results.get(timeout=240)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert not isinstance(got, str), got
    return got


@pytest.mark.parametrize("arch", ["GlmForCausalLM", "LlamaForCausalLM", "Glm4ForCausalLM"])
def test_tp_on_gpus_matches_one_gpu(tmp_path: Path, arch: str) -> None:
    """Greedy tokens and their logprobs at TP = 2 (and 4) equal one GPU's, with the fused
    all-reduce in CUDA graphs and eager steps, and with NCCL only. The 300-token prompt takes
    the NCCL path (more rows than the fused buffers hold); decode steps take the fused one.
    Glm4 (sandwich norms) never fuses."""
    path = make_tiny_checkpoint(arch, tmp_path / arch, num_key_value_heads=2)
    want_ids, want_lps, fused = _run(path, 1)
    assert not fused
    sizes = [2, 4] if torch.cuda.device_count() >= 4 else [2]
    for tp in sizes:
        for engine in [{}, {"enforce_eager": True}, {"disable_custom_all_reduce": True}]:
            ids, lps, fused = _run(path, tp, max_num_seqs=256 if not engine else 64, **engine)
            assert fused == (arch != "Glm4ForCausalLM" and not engine.get(
                "disable_custom_all_reduce", False))
            assert ids == want_ids, (tp, engine)
            for got, want in zip(lps, want_lps, strict=True):
                assert got == pytest.approx(want, abs=1e-3), (tp, engine)


def _sequential_engines(path: str, results: mp.Queue) -> None:
    """TP 2 (fused all-reduce, CUDA graphs), deleted; TP 1; TP 2 again: in this one process."""
    try:
        import gc

        import torch.distributed as dist

        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        prompts = [[5, 17, 42, 99, 7, 3], list(range(10, 310))]
        outs, leftover = [], []
        for tp in (2, 1, 2):
            # the default gpu_memory_utilization: a leak would leave the next one no KV cache
            llm = LLM(path, tensor_parallel_size=tp, max_model_len=512)
            outs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
            del llm
            gc.collect()
            leftover.append(torch.cuda.memory_allocated())
        results.put((outs, leftover, dist.is_initialized(), child_pids()))
    except BaseException:  # noqa: BLE001 - reported to the test
        results.put(traceback.format_exc())
        raise


def test_engines_one_after_another_in_one_process(tmp_path: Path) -> None:
    """NCCL groups (and the symmetric-memory buffers) torn down and built again in the same
    process: the same greedy tokens each time, the GPU memory given back in between."""
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "llama", num_key_value_heads=2)
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    proc = ctx.Process(target=_sequential_engines, args=(str(path), results))
    proc.start()
    try:
        got = results.get(timeout=400)
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    assert not isinstance(got, str), got
    outs, leftover, initialized, children = got
    assert outs[1] == outs[0] and outs[2] == outs[0]
    assert max(leftover) < 64 << 20, leftover  # weights, KV cache and graphs freed
    assert not initialized and not children
    assert proc.exitcode == 0
