"""The asyncio client the API server drives the engine core process with.

The API process tokenizes and validates prompts (InputProcessor), detokenizes and applies stop
strings (OutputProcessor), and routes each request's outputs to its own asyncio queue; the core
process (core_process.py) runs the scheduler and the model. Messages: messages.py.

Failures: if the core process dies (or is stopped because it stopped answering), every request in
flight gets `EngineDeadError` at once, and `restart` can replace the process. A request the core
refuses gets `EngineRequestError`, one past its deadline `RequestTimeoutError`; either way it is
aborted in the core, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing as mp
import threading
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from flatout.config import EngineArgs
from flatout.engine.core_process import run_engine_core
from flatout.engine.input_processor import InputProcessor, load_tokenizer_for
from flatout.engine.messages import (
    AbortRequest,
    CoreFailed,
    CoreOutputs,
    CoreReady,
    CoreRejected,
    CoreStats,
    EngineCoreRequest,
    EngineDeadError,
    EngineRequestError,
    MultiModalItem,
    RequestFieldError,
    RequestTimeoutError,
    Shutdown,
)
from flatout.engine.output_processor import OutputProcessor
from flatout.engine.outputs import RequestOutput
from flatout.engine.reasoning_split import ReasoningTokens
from flatout.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class AsyncEngineClient:
    """Drives an engine core process from an asyncio server."""

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.process: BaseProcess | None = None
        self._inbox_w: Connection | None = None
        self.queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self.stats = CoreStats()
        self.dead: str | None = None  # why the core is not serving, or None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()
        self._generation = 0  # one per core process; a stale reader's messages are dropped
        self._in_core: set[str] = set()  # requests sent whose last output has not come back
        self._busy_since = self._last_heard = time.monotonic()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self, timeout: float = 600.0) -> CoreReady:
        """Start the core process and wait until its model is loaded (blocking)."""
        msg = self._launch(timeout)
        self.ready = msg
        self.model_config = msg.model_config
        self.tokenizer = load_tokenizer_for(msg.model_config)
        cc = msg.cache_config
        cache_tokens = cc.planned_num_blocks * cc.block_size
        self.inputs = InputProcessor(msg.model_config, self.tokenizer, cache_tokens)
        self.outputs = OutputProcessor(self.tokenizer)
        self.stats.num_blocks = cc.planned_num_blocks
        return msg

    def restart(self, timeout: float = 600.0) -> None:
        """Replace a dead core process with a fresh one (blocking: run it in a worker thread),
        then call `attach` from the event loop to serve again."""
        if self.dead is None:
            raise RuntimeError("restart() needs a dead engine core")
        self._stop_process()
        self._launch(timeout)
        self.stats = CoreStats(num_blocks=self.ready.cache_config.planned_num_blocks)

    def _launch(self, timeout: float) -> CoreReady:
        ctx = mp.get_context("spawn")
        inbox_r, self._inbox_w = ctx.Pipe(duplex=False)
        self._outbox_r, outbox_w = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=run_engine_core, args=(self.args, inbox_r, outbox_w),
                                   name="flatout-engine-core", daemon=True)
        self.process.start()
        # drop this process's copies of the child's ends, so that the child's exit shows up
        # here as end-of-file instead of a reader blocked forever
        inbox_r.close()
        outbox_w.close()
        if not self._outbox_r.poll(timeout):
            raise EngineDeadError(f"engine core did not start within {timeout:.0f} s")
        try:
            msg = self._outbox_r.recv()
        except (EOFError, OSError):
            raise EngineDeadError(
                f"engine core {_exit_status(self.process)} while starting") from None
        if isinstance(msg, CoreFailed):
            raise EngineDeadError(f"engine core failed to start: {msg.message}")
        assert isinstance(msg, CoreReady)
        return msg

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start routing the core's outputs into `loop` (call from the event loop, at startup
        and after `restart`)."""
        self._loop = loop
        self._generation += 1
        self._in_core.clear()
        self._last_heard = time.monotonic()
        self.dead = None
        threading.Thread(target=self._read_outputs,
                         args=(self._outbox_r, self.process, self._generation),
                         name="flatout-core-reader", daemon=True).start()

    def shutdown(self) -> None:
        self._generation += 1  # the reader's end-of-file from here on is no news
        try:
            self._send(Shutdown())
        except (OSError, EngineDeadError):
            pass
        self._stop_process(grace=10.0)

    def _stop_process(self, grace: float = 0.0) -> None:
        if self.process is None:
            return
        self.process.join(timeout=grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
        if self._inbox_w is not None:
            self._inbox_w.close()

    @property
    def is_alive(self) -> bool:
        return self.dead is None and self.process is not None and self.process.is_alive()

    # -- failure handling -------------------------------------------------------------------
    def seconds_unresponsive(self) -> float:
        """How long the core has owed an answer: the time since its last message while it has
        requests to work on (0 when it has none, or is already known dead)."""
        if not self._in_core or self.dead is not None:
            return 0.0
        return time.monotonic() - max(self._last_heard, self._busy_since)

    def kill_hung(self, reason: str) -> None:
        """Stop a core that stopped answering and fail its requests now (event-loop thread)."""
        if self.process is not None:
            self.process.kill()
        self._dispatch(CoreFailed(reason), self._generation)

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """End every request in flight with an error (event-loop thread)."""
        for q in self.queues.values():
            q.put_nowait(make_error())

    # -- requests ---------------------------------------------------------------------------
    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        return SamplingParams.from_defaults(self.model_config.generation_defaults, **overrides)

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
        deadline: float | None = None, on_started: Callable[[], None] | None = None,
        mm_items: list[MultiModalItem] | None = None,
        reasoning: ReasoningTokens | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's delta (flatout/engine/outputs.py) after every step that advanced it,
        the last one with finished=True. Validation errors (RequestError) raise before anything
        is queued. Closing or cancelling the consumer (a client that went away) aborts the
        request in the core. `deadline` (event-loop time) raises RequestTimeoutError when passed;
        `on_started` is called once: at the first output, or at the end if none came.
        `mm_items`: the prompt's images (InputProcessor.expand_images made prompt and items).
        `reasoning`: the reasoning tags' ids, to split the deltas' reasoning from the answer."""
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        text, ids = self.inputs.encode(prompt)
        max_tokens = self.inputs.validate(ids, params)
        if request_id in self.queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.queues[request_id] = queue
        self.outputs.add_request(request_id, text, ids, params, reasoning)
        timer = None
        if deadline is not None:
            timer = asyncio.get_running_loop().call_at(
                deadline, queue.put_nowait, RequestTimeoutError("the request timed out"))
        finished = False
        try:
            if not self._in_core:
                self._busy_since = time.monotonic()
            self._in_core.add(request_id)
            self._send(
                EngineCoreRequest(request_id, ids, params, max_tokens, self.inputs.eos_token_ids,
                                  mm_items=list(mm_items or []))
            )
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                if on_started is not None:
                    on_started()
                    on_started = None
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if timer is not None:
                timer.cancel()
            if on_started is not None:
                on_started()
            self.queues.pop(request_id, None)
            if not finished:
                self.outputs.abort(request_id)
                self._in_core.discard(request_id)
                try:
                    self._send(AbortRequest(request_id))
                except (OSError, EngineDeadError):
                    pass

    def _send(self, msg: object) -> None:
        if self.dead is not None:
            raise EngineDeadError(self.dead)
        if self._inbox_w is None:
            raise EngineDeadError("the engine core was not started")
        with self._send_lock:
            self._inbox_w.send(msg)

    # -- output routing (reader thread -> event loop) ---------------------------------------
    def _read_outputs(self, conn: Connection, process: BaseProcess, generation: int) -> None:
        assert self._loop is not None
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = CoreFailed(f"engine core process {_exit_status(process)}")
            self._last_heard = time.monotonic()
            try:
                self._loop.call_soon_threadsafe(self._dispatch, msg, generation)
            except RuntimeError:  # the event loop is closed: the server has exited
                return
            if isinstance(msg, CoreFailed):
                return

    def _dispatch(self, msg: object, generation: int) -> None:
        if generation != self._generation:
            return  # from a core process that has been replaced
        if isinstance(msg, CoreFailed):
            if self.dead is not None:
                return
            self.dead = msg.message
            self._in_core.clear()
            log.error("engine core died: %s", msg.message)
            for q in self.queues.values():
                q.put_nowait(EngineDeadError(f"engine core died: {msg.message}"))
            return
        if isinstance(msg, CoreRejected):
            self._in_core.discard(msg.request_id)
            rejected = self.queues.get(msg.request_id)
            if rejected is not None:
                rejected.put_nowait(
                    RequestFieldError(msg.field, msg.message) if msg.field is not None else
                    EngineRequestError(f"the engine refused the request: {msg.message}"))
            return
        assert isinstance(msg, CoreOutputs)
        self.stats = msg.stats
        if not msg.outputs:
            return
        results, to_abort = self.outputs.process(msg.outputs)
        for request_id, index in to_abort:
            try:
                self._send(AbortRequest(request_id, index))
            except (OSError, EngineDeadError):
                pass  # the core is gone: its failure is on its way
        for out in results:
            if out.finished:
                self._in_core.discard(out.request_id)
            queue = self.queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)


def _exit_status(process: BaseProcess | None) -> str:
    if process is None:
        return "is missing"
    if process.exitcode is None:
        process.join(timeout=1.0)
    code = process.exitcode
    if code is None:
        return "closed its pipe"
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
