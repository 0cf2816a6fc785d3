"""A tensor-parallel worker: one rank other than 0, running the forwards rank 0 broadcasts.

    python -m flatout.worker.tp_worker --config CONFIG     # RANK, WORLD_SIZE, LOCAL_RANK,
                                                           # MASTER_ADDR, MASTER_PORT set
    python -m flatout.worker.tp_worker --model M --tensor-parallel-size 4 \\
        --nnodes 2 --node-rank 1 --master-addr HEAD --master-port 29500   # a whole node

The first form is one rank, given the resolved configs pickled (how rank 0 and a node's starter
start a node's ranks); engine flags with torchrun's variables set are one rank too (what any
such launcher can run). The second starts every rank of one non-head node of a multi-node group
and waits for them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

import torch

from flatout.config import EngineArgs, EngineConfig

log = logging.getLogger("flatout.worker")


def _watch_parent(parent_pid: int) -> None:
    """Exit when the process that started this worker is gone (no orphaned ranks)."""
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(0)


def resolve(args: EngineArgs) -> EngineConfig:
    """The configs of engine flags given to this process (rank 0 sends its workers its own)."""
    from flatout.models.registry import resolve_model
    from flatout.worker.parallel import resolve_device

    return args.resolve(resolve_model(args, resolve_device(args.device).type))


def run_rank(config: EngineConfig) -> None:
    from flatout import distributed
    from flatout.worker.control import ControlChannel
    from flatout.worker.model_runner import ModelRunner
    from flatout.worker.parallel import rank_device, resolve_device

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    parent = os.environ.get("FLATOUT_PARENT_PID")
    if parent:
        threading.Thread(target=_watch_parent, args=(int(parent),), daemon=True).start()
    device = rank_device(resolve_device(config.runner.device), local_rank)
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    torch.manual_seed(config.runner.seed)
    backend = "nccl" if device.type == "cuda" else "gloo"
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"])
    distributed.init_distributed(rank, world, backend, addr, port)
    runner = ModelRunner(config, device)
    channel = ControlChannel()
    with torch.inference_mode():
        while True:
            msg = channel.recv()
            if msg.stop:
                break
            if msg.batch is not None and msg.batch.seqs:
                runner.forward(msg.batch)
    distributed.destroy_distributed()


def run_node(ns: argparse.Namespace, config: EngineConfig) -> int:
    """Start every rank of node `ns.node_rank` and wait for them."""
    from flatout.worker.parallel import spawn_worker

    tp = config.parallel.tensor_parallel_size
    if tp % ns.nnodes:
        raise ValueError(f"tensor_parallel_size {tp} is not a multiple of {ns.nnodes} nodes")
    local = tp // ns.nnodes
    procs = [
        spawn_worker(config, ns.node_rank * local + i, tp, i, ns.master_addr, ns.master_port,
                     os.getpid())
        for i in range(local)
    ]
    return max(p.wait() for p in procs)


def main(argv: list[str] | None = None) -> int:
    from flatout.config import add_engine_args, engine_args_from

    p = argparse.ArgumentParser(prog="python -m flatout.worker.tp_worker")
    p.add_argument("--config", default=None, help="resolved configs, as rank 0 sends them")
    p.add_argument("--nnodes", type=int, default=int(os.environ.get("NNODES", "1")))
    p.add_argument("--node-rank", type=int, default=int(os.environ.get("NODE_RANK", "0")))
    p.add_argument("--master-addr", default=os.environ.get("MASTER_ADDR", "127.0.0.1"))
    p.add_argument("--master-port", type=int, default=int(os.environ.get("MASTER_PORT", "29500")))
    add_engine_args(p)
    ns = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if ns.config is not None:
        from flatout.worker.parallel import decode_config

        run_rank(decode_config(ns.config))
        return 0
    args = engine_args_from(ns)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        run_rank(resolve(args))  # started by torchrun or a similar launcher: one rank
        return 0
    if ns.node_rank < 1:
        raise SystemExit("node rank 0 is the engine itself: run `flatout serve` there")
    return run_node(ns, resolve(args))


if __name__ == "__main__":
    sys.exit(main())
