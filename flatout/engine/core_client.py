"""Messages between the API process and the engine core process, and the core's stats.

They are small dataclasses, pickled over multiprocessing pipes that only our two processes
hold: nothing a client sends is ever unpickled; client data crosses only as plain fields of these
messages, after the server has validated it. The core's loop is in core_process.py, the client
the API server drives it with in async_client.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from flatout.config import CacheConfig, ModelConfig
from flatout.engine.engine_core import EngineCore, EngineCoreOutput
from flatout.monitor.step_clock import StepTotals


# -- messages -------------------------------------------------------------------------------
@dataclass
class AbortRequest:
    request_id: str
    index: int | None = None


@dataclass
class Shutdown:
    pass


@dataclass
class CoreReady:
    model_config: ModelConfig
    cache_config: CacheConfig
    device: str
    load_seconds: float


@dataclass
class CoreStats:
    """A snapshot of the core's state after a step, for /metrics."""

    num_running: int = 0
    num_waiting: int = 0
    num_used_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    prefix_queried_tokens: int = 0
    prefix_hit_tokens: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_steps: int = 0
    step_batch_size: int = 0  # sequences in the last step
    timestamp: float = field(default_factory=time.time)
    # device time and work of finished steps by type (prefill/decode/mixed), and the device's
    # peaks, for the busy fraction and MBU/MFU (see flatout/monitor/step_clock.py)
    step_totals: dict[str, StepTotals] = field(default_factory=dict)
    peak_bandwidth: float = 0.0
    peak_flops: float = 0.0


@dataclass
class CoreOutputs:
    outputs: list[EngineCoreOutput]
    stats: CoreStats


@dataclass
class CoreFailed:
    message: str


def _stats(core: EngineCore, batch_size: int) -> CoreStats:
    bm, sched, st = core.block_manager, core.scheduler, core.stats
    clock = core.runner.step_clock
    return CoreStats(
        num_running=sched.num_running,
        num_waiting=sched.num_waiting,
        num_used_blocks=bm.num_used_blocks,
        num_blocks=bm.num_blocks,
        num_preemptions=sched.num_preemptions,
        prefix_queried_tokens=bm.num_queried_tokens,
        prefix_hit_tokens=bm.num_hit_tokens,
        num_prefill_tokens=st.num_prefill_tokens,
        num_decode_tokens=st.num_decode_tokens,
        num_steps=st.num_steps,
        step_batch_size=batch_size,
        step_totals=clock.totals(),
        peak_bandwidth=clock.peak.bandwidth,
        peak_flops=clock.peak.flops,
    )


@dataclass
class CoreRejected:
    """The core could not take one request (it is not queued; nothing else is affected)."""

    request_id: str
    message: str


class EngineDeadError(RuntimeError):
    """The engine core process is gone (or was stopped because it hung)."""


class EngineRequestError(RuntimeError):
    """The engine core refused one request."""


class RequestTimeoutError(TimeoutError):
    """A request ran past its deadline."""
