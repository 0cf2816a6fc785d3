"""The engine core in a process of its own, and the asyncio client the API server uses.

The core process runs nothing but the loop: take new requests and aborts from its inbox, run one
step, send the step's token outputs back. The API process tokenizes and validates prompts
(InputProcessor), detokenizes and applies stop strings (OutputProcessor), and routes each
request's outputs to its own asyncio queue. Messages are the small dataclasses below, sent over
multiprocessing pipes between our own two processes.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from flatout.config import CacheConfig, EngineArgs, ModelConfig
from flatout.engine.engine_core import EngineCore, EngineCoreOutput, EngineCoreRequest
from flatout.engine.llm_engine import InputProcessor, load_tokenizer_for
from flatout.engine.output_processor import OutputProcessor
from flatout.outputs import RequestOutput
from flatout.sampling_params import SamplingParams

log = logging.getLogger(__name__)


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


@dataclass
class CoreOutputs:
    outputs: list[EngineCoreOutput]
    stats: CoreStats


@dataclass
class CoreFailed:
    message: str


def _stats(core: EngineCore, batch_size: int) -> CoreStats:
    bm, sched, st = core.block_manager, core.scheduler, core.stats
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
    )


def run_engine_core(args: EngineArgs, inbox: Connection, outbox: Connection) -> None:
    """Entry point of the engine core process."""
    try:
        core = EngineCore(args)
    except Exception as e:  # report startup failures (bad checkpoint, OOM) to the server
        outbox.send(CoreFailed(f"{type(e).__name__}: {e}"))
        return
    ready = CoreReady(core.model_config, core.cache_config, str(core.device), core.load_seconds)
    outbox.send(ready)
    try:
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
                        core.add_request(msg)
                    elif isinstance(msg, AbortRequest):
                        core.abort(msg.request_id, msg.index)
                if not core.has_unfinished():
                    outbox.send(CoreOutputs([], _stats(core, 0)))
                    continue
            outputs = core.step()
            outbox.send(CoreOutputs(outputs, _stats(core, len(outputs))))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    except Exception as e:
        log.exception("engine core failed")
        outbox.send(CoreFailed(f"{type(e).__name__}: {e}"))


class EngineDeadError(RuntimeError):
    pass


class AsyncEngineClient:
    """Drives an engine core process from an asyncio server."""

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        ctx = mp.get_context("spawn")
        self._inbox_r, self._inbox_w = ctx.Pipe(duplex=False)
        self._outbox_r, self._outbox_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=run_engine_core,
            args=(args, self._inbox_r, self._outbox_w),
            name="flatout-engine-core",
            daemon=True,
        )
        self.queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self.stats = CoreStats()
        self.dead: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> CoreReady:
        """Start the core process and wait until its model is loaded (blocking)."""
        self.process.start()
        # drop this process's copies of the child's ends, so that the child's exit shows up
        # here as end-of-file instead of a reader blocked forever
        self._inbox_r.close()
        self._outbox_w.close()
        if not self._outbox_r.poll(timeout):
            raise EngineDeadError(f"engine core did not start within {timeout:.0f} s")
        msg = self._outbox_r.recv()
        if isinstance(msg, CoreFailed):
            raise EngineDeadError(f"engine core failed to start: {msg.message}")
        assert isinstance(msg, CoreReady)
        self.ready = msg
        self.model_config = msg.model_config
        self.tokenizer = load_tokenizer_for(msg.model_config)
        cc = msg.cache_config
        cache_tokens = cc.num_blocks * cc.block_size
        self.inputs = InputProcessor(msg.model_config, self.tokenizer, cache_tokens)
        self.outputs = OutputProcessor(self.tokenizer)
        self.stats.num_blocks = cc.num_blocks
        return msg

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start routing the core's outputs into `loop` (call from the server's startup)."""
        self._loop = loop
        threading.Thread(target=self._read_outputs, name="flatout-core-reader", daemon=True).start()

    def shutdown(self) -> None:
        try:
            self._send(Shutdown())
        except (OSError, EngineDeadError):
            pass
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.kill()

    @property
    def is_alive(self) -> bool:
        return self.dead is None and self.process.is_alive()

    # -- requests ---------------------------------------------------------------------------
    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        return SamplingParams.from_defaults(self.model_config.generation_defaults, **overrides)

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's output after every step that advanced it, the last one with
        finished=True. Validation errors (RequestError) raise before anything is queued.
        Cancelling the consumer (a client that went away) aborts the request in the core."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        text, ids = self.inputs.encode(prompt)
        max_tokens = self.inputs.validate(ids, params)
        if request_id in self.queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.queues[request_id] = queue
        self.outputs.add_request(request_id, text, ids, params)
        finished = False
        try:
            self._send(
                EngineCoreRequest(request_id, ids, params, max_tokens, self.inputs.eos_token_ids)
            )
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self.queues.pop(request_id, None)
            if not finished:
                self.outputs.abort(request_id)
                try:
                    self._send(AbortRequest(request_id))
                except (OSError, EngineDeadError):
                    pass

    def _send(self, msg: object) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        with self._send_lock:
            self._inbox_w.send(msg)

    # -- output routing (reader thread -> event loop) ---------------------------------------
    def _read_outputs(self) -> None:
        assert self._loop is not None
        while True:
            try:
                msg = self._outbox_r.recv()
            except (EOFError, OSError):
                msg = CoreFailed("engine core process exited")
            self._loop.call_soon_threadsafe(self._dispatch, msg)
            if isinstance(msg, CoreFailed):
                return

    def _dispatch(self, msg: object) -> None:
        if isinstance(msg, CoreFailed):
            self.dead = msg.message
            err = EngineDeadError(f"engine core died: {msg.message}")
            for q in self.queues.values():
                q.put_nowait(err)
            return
        assert isinstance(msg, CoreOutputs)
        self.stats = msg.stats
        if not msg.outputs:
            return
        results, to_abort = self.outputs.process(msg.outputs)
        for request_id, index in to_abort:
            self._send(AbortRequest(request_id, index))
        for out in results:
            q = self.queues.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
