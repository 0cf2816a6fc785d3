"""Keeps `flatout serve` honest about what it can serve: engine death and hangs, and shutdown.

- Engine death: the engine client fails every in-flight request at once and /health answers 503.
  Without `--restart-engine` the server then exits with status 1 (after a short linger, so that
  health checks see the 503) rather than accept requests it cannot serve. With it, a new engine
  core process is started and service resumes; meanwhile requests get 503 with Retry-After. An
  engine that dies again and again (more than `MAX_RESTARTS` in `RESTART_WINDOW_S`) is given up.
- Engine hang: a core that owes outputs and has sent nothing for `--engine-step-timeout` seconds
  is killed and treated as dead.
- SIGTERM or SIGINT: drain. New requests get 503 and /health 503; in-flight requests run to
  completion for up to `--shutdown-timeout` seconds; any left then end with an error; the process
  exits 0. A second signal ends every request still running at once (an error response, or an
  error event then `[DONE]` on a stream) and exits with 128 + the signal's number (143 for
  SIGTERM, 130 for SIGINT): the drain was cut short. A third exits without waiting for anything.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import deque
from types import FrameType

import prometheus_client as prom
import uvicorn

from flatout.engine.messages import EngineDeadError
from flatout.server.errors import OpenAIError
from flatout.server.logs import install_loop_exception_handler
from flatout.server.state import ServerState

log = logging.getLogger(__name__)

DEAD_ENGINE_LINGER_S = 2.0  # /health shows 503 this long before a dead server exits
FORCED_EXIT_WAIT_S = 2.0  # after a second signal: time for the failed requests to send their error
MAX_RESTARTS, RESTART_WINDOW_S = 3, 60.0
_TICK_S = 0.1


class Supervisor:
    def __init__(self, state: ServerState, *, restart_engine: bool, step_timeout: float | None,
                 shutdown_timeout: float) -> None:
        self.state = state
        self.restart_engine = restart_engine
        self.step_timeout = step_timeout
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self.server: uvicorn.Server | None = None
        self.restarts = prom.Counter("flatout:engine_restarts", "Engine core processes "
                                     "restarted after a failure.", registry=state.metrics.registry)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._signalled = False
        self._forced = False
        self._restart_times: deque[float] = deque()

    # -- lifecycle (called from the app's lifespan) -----------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tasks.append(loop.create_task(self._watch()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _exit(self) -> None:
        if self.server is not None:
            self.server.should_exit = True

    # -- engine death and hangs -------------------------------------------------------------
    async def _watch(self) -> None:
        client = self.state.client
        while True:
            await asyncio.sleep(_TICK_S)
            client.notice_exit()
            stalled = client.seconds_unresponsive()
            if self.step_timeout is not None and stalled > self.step_timeout:
                client.kill_hung(f"it stopped answering: nothing for {stalled:.0f} s while "
                                 f"requests were running (--engine-step-timeout)")
            if client.dead is not None and not await self._recover():
                return

    async def _recover(self) -> bool:
        """Restart the dead engine if allowed; False when the server must exit instead."""
        client = self.state.client
        now = time.monotonic()
        while self._restart_times and now - self._restart_times[0] > RESTART_WINDOW_S:
            self._restart_times.popleft()
        if (not self.restart_engine or self.state.admission.draining
                or len(self._restart_times) >= MAX_RESTARTS):
            log.error("the engine core is gone (%s); the server exits", client.dead)
            self.exit_code = 1
            await asyncio.sleep(DEAD_ENGINE_LINGER_S)
            self._exit()
            return False
        log.warning("the engine core is gone (%s); restarting it", client.dead)
        self._restart_times.append(now)
        try:
            await asyncio.to_thread(client.restart)
        except EngineDeadError as e:
            log.error("engine restart failed (%s); the server exits", e)
            self.exit_code = 1
            self._exit()
            return False
        assert self._loop is not None
        client.attach(self._loop)
        self.restarts.inc()
        log.warning("engine core restarted; serving again")
        return True

    # -- shutdown ---------------------------------------------------------------------------
    def on_signal(self, sig: int) -> None:
        """SIGTERM/SIGINT (runs in the signal handler): the first drains, a second ends the
        requests still running and exits non-zero, a third exits at once."""
        if self._loop is None or self.server is None:
            if self.server is not None:
                self.server.should_exit = self.server.force_exit = True
            return
        if not self._signalled:
            self._signalled = True
            self._loop.call_soon_threadsafe(self._begin_drain)
        elif not self._forced:
            self._forced = True
            self._loop.call_soon_threadsafe(self._cut_short, sig)
        else:
            self.server.should_exit = self.server.force_exit = True

    def _begin_drain(self) -> None:
        adm = self.state.admission
        adm.draining = True
        log.info("shutting down: finishing %d requests (at most %.0f s; a second signal "
                 "ends them now)", adm.num_in_flight, self.shutdown_timeout)
        assert self._loop is not None
        self._tasks.append(self._loop.create_task(self._drain()))

    def _cut_short(self, sig: int) -> None:
        """The second signal: every request still running ends now with an error its client
        sees (not a cut connection), then the server exits with 128 + `sig`."""
        adm = self.state.admission
        adm.draining = True
        if self.exit_code == 0:
            self.exit_code = 128 + sig
        log.warning("second signal: ending the %d requests still running and exiting",
                    adm.num_in_flight)
        self.state.client.fail_all(lambda: OpenAIError(
            "the server was stopped (a second signal) before the request finished", status=503,
            code="shutting_down"))
        assert self._loop is not None
        self._tasks.append(self._loop.create_task(self._exit_when_answered()))

    async def _exit_when_answered(self) -> None:
        adm = self.state.admission
        loop = asyncio.get_running_loop()
        deadline = loop.time() + FORCED_EXIT_WAIT_S
        while adm.num_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.02)
        self._exit()

    async def _drain(self) -> None:
        adm = self.state.admission
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout
        while adm.num_in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if adm.num_in_flight:
            log.warning("%d requests still running after --shutdown-timeout; ending them",
                        adm.num_in_flight)
            self.state.client.fail_all(lambda: OpenAIError(
                "the server shut down before the request finished", status=503,
                code="shutting_down"))
            deadline = loop.time() + 2.0
            while adm.num_in_flight and loop.time() < deadline:
                await asyncio.sleep(0.05)
        self._exit()


class FlatoutServer(uvicorn.Server):
    """uvicorn's server with flatout's signal handling: a drained shutdown exits 0 (uvicorn
    itself re-raises the signal after shutting down, which ends the process with it)."""

    def __init__(self, config: uvicorn.Config, supervisor: Supervisor) -> None:
        super().__init__(config)
        self.supervisor = supervisor
        supervisor.server = self

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        install_loop_exception_handler(asyncio.get_running_loop())  # e.g. accept() at the fd limit
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.supervisor.on_signal(sig)
