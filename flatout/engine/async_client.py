"""The asyncio client the API server drives the engine core process with.

The API process tokenizes and validates prompts (InputProcessor), detokenizes and applies stop
strings (OutputProcessor), and routes each request's outputs to its own asyncio queue; the core
process (core_process.py) runs the scheduler and the model. Messages: messages.py.

Backlog: outputs wait in their request's queue until its consumer takes them. A consumer that
falls more than `max_backlog_bytes` behind while it is busy elsewhere (a stream blocked in
sending to a client that stopped reading, whose socket buffers are full; not one waiting for
the event loop to resume it) is treated as gone: its request is aborted in the core at once (its KV
blocks freed), what waited for it is dropped, and its consumer gets `ConsumerTooSlowError`.

Catching up: a consumer resumed after more than one of its request's deltas arrived (the event
loop was busy: a burst of steps, a pause) takes them as one delta (`join_deltas`), so a stream
sends one chunk for what waited rather than one per step, and a loop that fell behind does less
work per token until it has caught up. Not for a model without a tokenizer: its streams carry no
text, and one chunk per step is all a client has to time its tokens by.

Failures: if the core process dies (or is stopped because it stopped answering), every request in
flight gets `EngineDeadError` at once, and `restart` can replace the process. A request the core
refuses gets `EngineRequestError`, one past its deadline `RequestTimeoutError`; either way it is
aborted in the core, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

from flatout.config import EngineArgs
from flatout.engine.core_process import freeze_heap as freeze_process_heap
from flatout.engine.core_process import run_engine_core
from flatout.engine.input_processor import InputProcessor, load_tokenizer_for
from flatout.engine.messages import (
    AbortRequest,
    ConsumerTooSlowError,
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
from flatout.engine.outputs import RequestOutput, join_deltas
from flatout.engine.reasoning_split import ReasoningTokens
from flatout.sampling_params import SamplingParams

log = logging.getLogger(__name__)


def backlog_bytes(out: RequestOutput) -> int:
    """What a delta holds in memory while it waits, estimated from its contents (measured
    against tracemalloc in tests/engine/test_backlog.py)."""
    size = 300
    for o in out.outputs:
        size += 250 + len(o.text) + 40 * len(o.token_ids)
        for lp in o.logprobs or ():
            size += 250 + 80 * len(lp.top)
    return size


# outputs of one core step dispatched per turn of the event loop (the loop serves others between)
DISPATCH_CHUNK = 32


class OutputQueue:
    """One request's outputs (or the exception that ends it) on their way to its consumer,
    with the bytes they hold. `coalesce`: `get` joins the deltas waiting into one."""

    def __init__(self, coalesce: bool = False) -> None:
        self._items: collections.deque[tuple[RequestOutput | BaseException, int]] = (
            collections.deque())
        self._waiter: asyncio.Future[None] | None = None
        self.coalesce = coalesce
        self.backlog = 0  # estimated bytes of the outputs waiting
        # the consumer is waiting in `get` (perhaps not yet resumed: outputs that pile up while
        # the event loop is busy elsewhere are no sign of a slow consumer)
        self.consumer_waiting = False

    def put(self, item: RequestOutput | BaseException) -> None:
        size = backlog_bytes(item) if isinstance(item, RequestOutput) else 0
        self.backlog += size
        self._items.append((item, size))
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> RequestOutput | BaseException:
        self.consumer_waiting = True
        try:
            while not self._items:
                self._waiter = asyncio.get_running_loop().create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
        finally:
            self.consumer_waiting = False
        item, size = self._items.popleft()
        self.backlog -= size
        if self.coalesce and isinstance(item, RequestOutput):
            # the deltas that arrived meanwhile, up to an exception (which comes next)
            while self._items and isinstance(self._items[0][0], RequestOutput):
                later, size = self._items.popleft()
                self.backlog -= size
                item = join_deltas(item, later)  # type: ignore[arg-type]
        return item

    def fail(self, error: BaseException) -> None:
        """Drop what waits; the consumer gets `error` next."""
        self._items.clear()
        self.backlog = 0
        self.put(error)


class AsyncEngineClient:
    """Drives an engine core process from an asyncio server."""

    def __init__(self, args: EngineArgs, max_backlog_bytes: int | None = None,
                 freeze_heap: bool = False) -> None:
        """`max_backlog_bytes`: how far (estimated bytes of outputs) a request's consumer may
        fall behind before the request is aborted; None: no limit. `freeze_heap`: freeze the
        process's heap at the first idle after work (a server process; see
        core_process.freeze_heap)."""
        if max_backlog_bytes is not None and max_backlog_bytes < 1:
            raise ValueError(f"--max-stream-backlog-bytes must be >= 1, got {max_backlog_bytes}")
        self.args = args
        self.max_backlog_bytes = max_backlog_bytes
        self.process: BaseProcess | None = None
        self._inbox_w: Connection | None = None
        self.queues: dict[str, OutputQueue] = {}
        self._on_too_slow: dict[str, Callable[[], None]] = {}
        self.stats = CoreStats()
        self.dead: str | None = None  # why the core is not serving, or None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._send_lock = threading.Lock()
        self._generation = 0  # one per core process; a stale reader's messages are dropped
        # the generation whose pipe the reader saw close: known dead from that moment, before
        # the event loop has run the failure (which fails the requests in flight)
        self._pipe_closed = -1
        self._in_core: set[str] = set()  # requests sent whose last output has not come back
        self._busy_since = self._last_heard = time.monotonic()
        # messages from the reader thread not yet dispatched (event-loop thread; see _arrived)
        self._arrivals: collections.deque[tuple[object, int]] = collections.deque()
        self._draining = False
        self._warmed = not freeze_heap  # the heap frozen at the first idle after work
        self.tokenizer: Any = None  # the model's (start); None: token ids only

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
        return (self.dead is None and self._pipe_closed != self._generation
                and self.process is not None and self.process.is_alive()
                and not process_exiting(self.process.pid))

    def problem(self) -> str | None:
        """Why the core cannot take requests now (None: it can)."""
        if self.dead is not None:
            return self.dead
        return None if self.is_alive else "the engine core is not running"

    # -- failure handling -------------------------------------------------------------------
    def seconds_unresponsive(self) -> float:
        """How long the core has owed an answer: the time since its last message while it has
        requests to work on (0 when it has none, or is already known dead)."""
        if not self._in_core or self.dead is not None:
            return 0.0
        return time.monotonic() - max(self._last_heard, self._busy_since)

    def notice_exit(self) -> None:
        """Fail the requests in flight now if the core has begun to exit, rather than when its
        pipe closes, which for a big process comes 0.1-0.5 s later (event-loop thread)."""
        if self.dead is None and self.process is not None and process_exiting(self.process.pid):
            self._dispatch(CoreFailed("engine core process is exiting (killed or crashed)"),
                           self._generation)

    def kill_hung(self, reason: str) -> None:
        """Stop a core that stopped answering and fail its requests now (event-loop thread)."""
        if self.process is not None:
            self.process.kill()
        self._dispatch(CoreFailed(reason), self._generation)

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        """End every request in flight with an error (event-loop thread)."""
        for q in self.queues.values():
            q.put(make_error())

    # -- requests ---------------------------------------------------------------------------
    def default_sampling_params(self, **overrides: Any) -> SamplingParams:
        return SamplingParams.from_defaults(self.model_config.generation_defaults, **overrides)

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
        deadline: float | None = None, on_started: Callable[[], None] | None = None,
        mm_items: list[MultiModalItem] | None = None,
        on_too_slow: Callable[[], None] | None = None,
        reasoning: ReasoningTokens | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's delta (flatout/engine/outputs.py) after every step that advanced it,
        the last one with finished=True. Validation errors (RequestError) raise before anything
        is queued. Closing or cancelling the consumer (a client that went away) aborts the
        request in the core. `deadline` (event-loop time) raises RequestTimeoutError when passed;
        `on_started` is called once: at the first output, or at the end if none came.
        `mm_items`: the prompt's images (InputProcessor.expand_images made prompt and items).
        `on_too_slow` is called (from the event loop, at once) if the request is aborted because
        its outputs were not taken (the module docstring's backlog); the iteration then raises
        ConsumerTooSlowError when resumed.
        `reasoning`: the reasoning tags' ids, to split the deltas' reasoning from the answer."""
        problem = self.problem()
        if problem is not None:
            raise EngineDeadError(problem)
        text, ids = self.inputs.encode(prompt)
        max_tokens = self.inputs.validate(ids, params)
        if request_id in self.queues:
            raise ValueError(f"request id {request_id!r} is already in use")
        queue = OutputQueue(coalesce=self.tokenizer is not None)
        self.queues[request_id] = queue
        if on_too_slow is not None:
            self._on_too_slow[request_id] = on_too_slow
        self.outputs.add_request(request_id, text, ids, params, reasoning)
        timer = None
        if deadline is not None:
            timer = asyncio.get_running_loop().call_at(
                deadline, queue.put, RequestTimeoutError("the request timed out"))
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
            self._on_too_slow.pop(request_id, None)
            if self.queues.pop(request_id, None) is not None and not finished:
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
        try:
            with self._send_lock:
                self._inbox_w.send(msg)
        except OSError as e:  # the core's end is closed: it died (its failure is on its way)
            raise EngineDeadError(f"the engine core's pipe is closed ({e.strerror})") from e

    # -- output routing (reader thread -> event loop) ---------------------------------------
    def _read_outputs(self, conn: Connection, process: BaseProcess, generation: int) -> None:
        assert self._loop is not None
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                self._pipe_closed = generation  # before waiting for the exit status
                msg = CoreFailed(f"engine core process {_exit_status(process)}")
            self._last_heard = time.monotonic()
            try:
                self._loop.call_soon_threadsafe(self._arrived, msg, generation)
            except RuntimeError:  # the event loop is closed: the server has exited
                return
            if isinstance(msg, CoreFailed):
                return

    def _arrived(self, msg: object, generation: int) -> None:
        """A message from the core (event-loop thread): dispatched in arrival order, a step's
        outputs DISPATCH_CHUNK at a time with the loop free in between, so that one big step
        (n=128 samples with 20 top logprobs each) never holds the loop for its whole length."""
        self._arrivals.append((msg, generation))
        if not self._draining:
            self._draining = True
            self._drain()

    def _drain(self) -> None:
        if not self._arrivals:
            self._draining = False
            return
        msg, generation = self._arrivals.popleft()
        if isinstance(msg, CoreOutputs) and len(msg.outputs) > DISPATCH_CHUNK:
            rest = CoreOutputs(msg.outputs[DISPATCH_CHUNK:], msg.stats)
            self._arrivals.appendleft((rest, generation))
            msg = CoreOutputs(msg.outputs[:DISPATCH_CHUNK], msg.stats)
        try:
            self._dispatch(msg, generation)
        finally:
            if self._arrivals:
                assert self._loop is not None
                self._loop.call_soon(self._drain)
            else:
                self._draining = False

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
                q.put(EngineDeadError(f"engine core died: {msg.message}"))
            return
        if isinstance(msg, CoreRejected):
            self._in_core.discard(msg.request_id)
            rejected = self.queues.get(msg.request_id)
            if rejected is not None:
                rejected.put(
                    RequestFieldError(msg.field, msg.message) if msg.field is not None else
                    EngineRequestError(f"the engine refused the request: {msg.message}"))
            return
        assert isinstance(msg, CoreOutputs)
        self.stats = msg.stats
        if not msg.outputs:
            if not self._warmed and msg.stats.num_steps > 0 and not self.queues:
                self._warmed = True
                freeze_process_heap()
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
                queue.put(out)
                limit = self.max_backlog_bytes
                if (limit is not None and queue.backlog > limit and not out.finished
                        and not queue.consumer_waiting):
                    self._drop_too_slow(out.request_id, queue, limit)

    def _drop_too_slow(self, request_id: str, queue: OutputQueue, limit: int) -> None:
        """Abort a request whose consumer stopped taking its outputs (event-loop thread)."""
        del self.queues[request_id]  # its consumer's cleanup finds nothing left to abort
        self.outputs.abort(request_id)
        self._in_core.discard(request_id)
        try:
            self._send(AbortRequest(request_id))
        except (OSError, EngineDeadError):
            pass
        queue.fail(ConsumerTooSlowError(
            f"the client fell more than {limit} bytes of output behind and was dropped"))
        callback = self._on_too_slow.pop(request_id, None)
        if callback is not None:
            callback()


_PF_EXITING = 0x4  # the kernel's flag on a task that has begun to exit


def process_exiting(pid: int | None) -> bool:
    """Whether the kernel has begun tearing process `pid` down (Linux; False elsewhere).

    A killed process with many threads and a large heap takes a while (0.1-0.5 s) to release
    its memory; only then do its pipes close and can it be waited for. Its main thread is marked
    exiting (then a zombie) at once, which /proc shows."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return os.path.isdir("/proc/self")  # no entry: gone (where /proc exists at all)
    except (OSError, IndexError):
        return False
    state, flags = fields[0], int(fields[6])  # fields 3 and 9 of proc(5)'s stat
    return state in (b"Z", b"X", b"x") or bool(flags & _PF_EXITING)


def _exit_status(process: BaseProcess | None) -> str:
    if process is None:
        return "is missing"
    if process.exitcode is None:
        process.join(timeout=1.0)
    code = process.exitcode
    if code is None:
        return "closed its pipe"
    return f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
