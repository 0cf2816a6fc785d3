"""Engines one after another in one process (a notebook, a sweep): TP 2, deleted, then TP 1,
then TP 2 again, each with the same greedy output; afterwards no worker process, no process
group, no socket and no shared memory of theirs is left (CPU, gloo)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from flatout import LLM, SamplingParams, distributed
from tests.helpers.processes import child_pids, num_sockets
from tests.helpers.tiny_checkpoints import make_tiny_checkpoint

PROMPTS = [[5, 17, 42, 99, 7, 3], list(range(10, 50))]
ENGINE = {"max_model_len": 128, "max_num_batched_tokens": 32, "num_kv_blocks": 32}
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _workers(llm: LLM) -> list[int]:
    group = llm.engine.core.tp_group
    return [] if group is None else [p.pid for p in group.procs]


def test_tp2_deleted_then_tp1_then_tp2_in_one_process(tmp_path: Path) -> None:
    path = str(make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "llama"))
    children, sockets, shm = child_pids(), num_sockets(), _shm()

    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    first_workers = _workers(llm)
    assert len(first_workers) == 1 and set(first_workers) <= child_pids()
    want = _greedy(llm)
    del llm  # no shutdown() call: dropping the last reference stops the group
    assert not set(first_workers) & child_pids()
    assert not dist.is_initialized() and distributed.get_tp_size() == 1

    one = LLM(path, tensor_parallel_size=1, **ENGINE)
    assert _greedy(one) == want
    one.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        one.generate(PROMPTS, GREEDY)

    with LLM(path, tensor_parallel_size=2, **ENGINE) as llm:
        assert _workers(llm) != first_workers
        assert _greedy(llm) == want
        # a second engine while this one's group lives is refused, naming the way out
        with pytest.raises(RuntimeError, match=r"llm\.shutdown\(\)"):
            LLM(path, tensor_parallel_size=1, **ENGINE)
    llm.shutdown()  # idempotent

    gc.collect()
    assert child_pids() <= children  # every worker reaped, none a zombie
    assert not dist.is_initialized() and distributed.get_tp_size() == 1
    assert num_sockets() <= sockets  # the process groups' TCP store and gloo pairs are closed
    assert _shm() <= shm


_EXIT_WITHOUT_SHUTDOWN = """
import sys
from flatout import LLM, SamplingParams
llm = LLM(sys.argv[1], tensor_parallel_size=2, max_model_len=128, num_kv_blocks=32)
print(llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids)
print(*[p.pid for p in llm.engine.core.tp_group.procs], flush=True)
"""


def test_interpreter_exit_stops_the_workers_without_a_hang(tmp_path: Path) -> None:
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "llama")
    proc = subprocess.run([sys.executable, "-c", _EXIT_WITHOUT_SHUTDOWN, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    workers = [int(pid) for pid in proc.stdout.split("\n")[1].split()]
    assert len(workers) == 1
    deadline = time.monotonic() + 10  # reaped by the exiting engine, or gone with it
    while time.monotonic() < deadline and Path(f"/proc/{workers[0]}").exists():
        time.sleep(0.1)
    assert not Path(f"/proc/{workers[0]}").exists()
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
