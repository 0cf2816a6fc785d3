"""The engine core process: its entry point and loop (the client side is in async_client.py).

The loop takes new requests and aborts from its inbox, runs one step, and sends the step's token
outputs back. A request the core cannot take (`add_request` raises) is rejected on its own; only
a failure of a step, which belongs to no single request, ends the process.

The process ignores SIGINT and SIGTERM: a Ctrl-C in a terminal or a service manager signalling
the whole process group must not kill the engine under a server that is draining its requests.
It ends when the server sends `Shutdown`, when its pipes close (the server exited), or by SIGKILL.
"""

from __future__ import annotations

import gc
import logging
import signal
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from flatout.config import EngineArgs
from flatout.engine.messages import (
    AbortRequest,
    CoreFailed,
    CoreOutputs,
    CoreReady,
    CoreRejected,
    CoreStats,
    EngineCoreRequest,
    Shutdown,
)

if TYPE_CHECKING:  # the API process imports this module (for the entry point) without torch
    from flatout.engine.engine_core import EngineCore

log = logging.getLogger(__name__)


def run_engine_core(args: EngineArgs, inbox: Connection, outbox: Connection) -> None:
    """Entry point of the engine core process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from flatout.engine.engine_core import EngineCore

    try:
        core = EngineCore(args)
    except Exception as e:  # report startup failures (bad checkpoint, OOM) to the server
        outbox.send(CoreFailed(f"{type(e).__name__}: {e}"))
        return
    freeze_heap()
    try:
        outbox.send(CoreReady(core.model_config, core.cache_config, str(core.device),
                              core.load_seconds))
        _serve(core, inbox, outbox)
    except (EOFError, BrokenPipeError):
        return  # the server is gone
    except Exception as e:
        log.exception("engine core failed")
        try:
            outbox.send(CoreFailed(f"{type(e).__name__}: {e}"))
        except OSError:
            pass
    finally:
        core.shutdown()


def freeze_heap() -> None:
    """Keep what exists now (imports, the model's modules, what the first requests built
    lazily) out of the collector's full passes. In the engine core each pass scanned ~200,000
    such objects and held a step 100-180 ms on a 2-core CPU; in the API process ~100,000 held
    the event loop 60-130 ms."""
    gc.collect()
    gc.freeze()


def _serve(core: EngineCore, inbox: Connection, outbox: Connection) -> None:
    warmed = False  # the first steps import and build lazily; frozen once, at the first idle
    while True:
        # block while idle; otherwise take whatever arrived and keep stepping
        if not core.has_unfinished() or inbox.poll(0):
            msgs = [inbox.recv()]
            while inbox.poll(0):
                msgs.append(inbox.recv())
            for msg in msgs:
                if isinstance(msg, Shutdown):
                    return
                if isinstance(msg, EngineCoreRequest):
                    _add(core, msg, outbox)
                elif isinstance(msg, AbortRequest):
                    core.abort(msg.request_id, msg.index)
            _send_rejected(core, outbox)
            if not core.has_unfinished():
                outbox.send(CoreOutputs([], core_stats(core, 0)))  # idle: the pool should be free
                if not warmed and core.stats.num_steps > 0:
                    warmed = True
                    freeze_heap()
                continue
        outputs = core.step()
        _send_rejected(core, outbox)
        outbox.send(CoreOutputs(outputs, core_stats(core, len(outputs))))


def core_stats(core: EngineCore, batch_size: int) -> CoreStats:
    """The snapshot of the core's state sent with every step's outputs."""
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


def _add(core: EngineCore, req: EngineCoreRequest, outbox: Connection) -> None:
    """Queue one request; if the core refuses it, that request fails and nothing else does."""
    try:
        core.add_request(req)
    except Exception as e:
        log.warning("engine core refused request %s: %s", req.request_id, type(e).__name__)
        outbox.send(CoreRejected(req.request_id, f"{type(e).__name__}: {e}"))


def _send_rejected(core: EngineCore, outbox: Connection) -> None:
    """Fail the requests whose grammar did not compile (a 400 naming the field)."""
    for request_id, e in core.take_rejected():
        outbox.send(CoreRejected(request_id, str(e), field=e.field))
