"""Starting and stopping a tensor-parallel group, from rank 0's side.

Rank 0 lives in the engine core's process and drives; the other ranks of this node are worker
processes (`python -m flatout.worker.tp_worker`) started here with torchrun's environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Ranks on other nodes are
started there by the same module (see docs/multi_node.md). All of them rendezvous over
torch.distributed: NCCL on GPUs, gloo on CPU.
"""

from __future__ import annotations

import atexit
import base64
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch

from flatout import distributed
from flatout.config import EngineConfig, ModelConfig, parse_int4_method

log = logging.getLogger(__name__)


WORKER_LOST_EXIT_CODE = 75


def check_tensor_parallel(cfg: ModelConfig, tp: int) -> None:
    """Raise a clear ValueError when `cfg`'s shapes cannot be split `tp` ways."""
    if tp == 1:
        return
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    problems = []
    if heads % tp:
        problems.append(f"{heads} attention heads do not split evenly over {tp} ranks")
    if kv % tp and tp % kv:
        problems.append(
            f"{kv} KV heads: the size must divide them or be a multiple of them"
        )
    if cfg.intermediate_size % tp:
        problems.append(f"intermediate size {cfg.intermediate_size} is not divisible by {tp}")
    problems += _cut_groups(cfg, tp)
    if problems:
        ok = [n for n in (1, 2, 4, 8) if n == 1 or _divides(cfg, n)]
        raise ValueError(
            f"tensor_parallel_size={tp} does not fit {cfg.architecture} ({cfg.model}): "
            + "; ".join(problems)
            + f". Sizes that work: {', '.join(map(str, ok))}"
        )


def _cut_groups(cfg: ModelConfig, tp: int) -> list[str]:
    """4-bit weights in groups: a row-parallel layer's inputs per rank (attention's output
    projection, the MLP's down projection) must be whole groups."""
    int4 = parse_int4_method(cfg.quantization or "")
    if int4 is None or int4[0] == 0:
        return []
    group = int4[0]
    q = cfg.num_attention_heads * cfg.head_dim
    return [f"{what} has {size} / {tp} = {size // tp} inputs per rank, not whole 4-bit groups of "
            f"{group}" for what, size in (("the attention output", q),
                                          ("the MLP down projection", cfg.intermediate_size))
            if size % tp == 0 and (size // tp) % group]


def _divides(cfg: ModelConfig, n: int) -> bool:
    kv = cfg.num_key_value_heads
    return (
        cfg.num_attention_heads % n == 0
        and (kv % n == 0 or n % kv == 0)
        and cfg.intermediate_size % n == 0
        and not _cut_groups(cfg, n)
    )


def num_nodes() -> int:
    return int(os.environ.get("FLATOUT_NNODES", "1"))


def resolve_device(device: str) -> torch.device:
    """The device an `EngineArgs.device` string names ("auto": CUDA when there is one)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is available")
    return torch.device(device)


def rank_device(base: torch.device, local_rank: int) -> torch.device:
    if base.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return base


def encode_config(config: EngineConfig) -> str:
    """The resolved configs as one command-line argument (pickled; rank 0 to its workers)."""
    return base64.b64encode(pickle.dumps(config, protocol=pickle.HIGHEST_PROTOCOL)).decode()


def decode_config(text: str) -> EngineConfig:
    config = pickle.loads(base64.b64decode(text))
    if not isinstance(config, EngineConfig):
        raise TypeError(f"expected an EngineConfig, got {type(config).__name__}")
    return config


class TensorParallelGroup:
    """Rank 0's handle on the group: spawns this node's other ranks, joins, and stops them."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        tp = config.parallel.tensor_parallel_size
        check_tensor_parallel(config.model, tp)
        nnodes = num_nodes()
        if tp % nnodes:
            raise ValueError(f"tensor_parallel_size {tp} is not a multiple of {nnodes} nodes")
        self.local = tp // nnodes
        if device.type == "cuda" and self.local > torch.cuda.device_count():
            raise ValueError(
                f"{self.local} ranks on this node need {self.local} GPUs; "
                f"{torch.cuda.device_count()} are visible"
            )
        addr, port = distributed.env_rendezvous()
        if nnodes == 1:
            addr, port = "127.0.0.1", distributed.free_port()
        elif port is None:
            raise ValueError("multi-node tensor parallelism needs MASTER_ADDR and MASTER_PORT")
        backend = "nccl" if device.type == "cuda" else "gloo"
        self._threads = torch.get_num_threads()
        if device.type == "cpu":  # the ranks share this node's cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.local))
        self.procs = [
            self._spawn(config, rank, tp, rank, addr, port) for rank in range(1, self.local)
        ]
        self.stopped = False
        # tells the other ranks to stop (rank 0's runner sends them the message), once it exists
        self.stop_workers: Callable[[], None] | None = None
        atexit.register(self.shutdown)  # unregistered by shutdown: no reference outlives it
        self._watchdog: threading.Thread | None = None
        try:
            self.device = rank_device(device, 0)
            distributed.init_distributed(0, tp, backend, addr, port)
        except BaseException:
            self.shutdown()
            raise
        log.info("tensor parallel: %d ranks (%d on this node), %s on %s:%d", tp, self.local,
                 backend, addr, port)
        self._watchdog = threading.Thread(target=self._watch_workers, name="tp-watchdog",
                                          daemon=True)
        self._watchdog.start()

    def _watch_workers(self) -> None:
        """A rank that dies leaves rank 0 blocked in a collective (NCCL waits for its peer until
        a timeout of minutes), so this process ends as soon as one does: the server's
        supervisor then restarts or stops the engine; an offline caller sees its process exit
        with the reason logged, not a hang."""
        while not self.stopped:
            for rank, p in enumerate(self.procs, start=1):
                code = p.poll()
                if code is not None and not self.stopped:
                    log.critical("tensor-parallel rank %d exited with code %s while serving; "
                                 "the group cannot continue without it: exiting", rank, code)
                    logging.shutdown()
                    os._exit(WORKER_LOST_EXIT_CODE)
            time.sleep(0.2)

    @staticmethod
    def _spawn(
        config: EngineConfig, rank: int, world: int, local_rank: int, addr: str, port: int
    ) -> subprocess.Popen:
        return spawn_worker(config, rank, world, local_rank, addr, port, os.getpid())

    def shutdown(self) -> None:
        """Tell the workers to stop (`stop_workers`), reap them, leave the group (idempotent).

        Afterwards this process is as before the group: no worker process, no process group
        (its TCP store's port closed), no watchdog thread, its thread count restored, and
        nothing registered at exit that would keep the runner (weights, KV cache) alive."""
        if self.stopped:
            return
        self.stopped = True
        stop, self.stop_workers = self.stop_workers, None
        told = False
        if stop is not None:
            try:
                stop()
                told = True
            except Exception:  # noqa: BLE001 - the workers may be gone already
                log.warning("could not tell the workers to stop", exc_info=True)
        if told:  # every rank leaves the group at once (NCCL's teardown may wait for peers)
            distributed.destroy_distributed()
        for p in self.procs:
            try:
                p.wait(timeout=30 if told else 1)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        distributed.destroy_distributed()  # after a failed start: once the workers are gone
        torch.set_num_threads(self._threads)
        if self._watchdog is not None and self._watchdog is not threading.current_thread():
            self._watchdog.join()
        atexit.unregister(self.shutdown)


def ensure_no_live_group(tp: int) -> None:
    """Refuse to build an engine while another one's tensor-parallel group is alive in this
    process: the layers read the group's rank and size, and a process joins one group at a time."""
    if distributed.get_tp_size() > 1 or (tp > 1 and torch.distributed.is_initialized()):
        raise RuntimeError(
            "another engine's tensor-parallel group is still running in this process: shut it "
            "down first (llm.shutdown(), `del llm` or `with LLM(...) as llm:`)"
        )


def spawn_worker(
    config: EngineConfig, rank: int, world: int, local_rank: int, addr: str, port: int,
    parent_pid: int,
) -> subprocess.Popen:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank),
               MASTER_ADDR=addr, MASTER_PORT=str(port), FLATOUT_PARENT_PID=str(parent_pid))
    cmd = [sys.executable, "-m", "flatout.worker.tp_worker", "--config", encode_config(config)]
    return subprocess.Popen(cmd, env=env)
