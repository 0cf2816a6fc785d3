"""`flatout serve` as a child process on 127.0.0.1 and a free port, as users start it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

_URL = re.compile(r"serving '([^']*)' on (http://\S+) ")
_STARTUP_TIMEOUT = 240.0


class ServerProcess:
    """A running `flatout serve`; `url` is e.g. http://127.0.0.1:41234. With wait=False the
    constructor returns at once (do other work while the server boots), then call wait().
    `module` is the entry point run with `python -m` (flatout's CLI unless a test wraps it)."""

    url: str
    model: str

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None,
                 wait: bool = True, module: str = "flatout.cli") -> None:
        self.log_path = log_path
        self.log = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, "serve", "--port", "0", *args],
            stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            cwd=Path(__file__).resolve().parents[2],
        )
        if wait:
            self.wait()

    def wait(self) -> ServerProcess:
        self.url, self.model = self._wait_for_banner()
        return self

    def _wait_for_banner(self) -> tuple[str, str]:
        deadline = time.monotonic() + _STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            m = _URL.search(self.log_path.read_text())
            if m:
                return m.group(2), m.group(1)
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"flatout serve did not start:\n{self.log_path.read_text()}")

    @property
    def output(self) -> str:
        return self.log_path.read_text()

    def metrics(self) -> dict[str, float]:
        """/metrics as {name_without_labels: value} for the unlabelled-or-single series."""
        text = httpx.get(f"{self.url}/metrics").text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
            out.setdefault(name.split("{", 1)[0], float(value))
        return out

    def engine_core_pid(self) -> int:
        """The engine core: the server's child started by multiprocessing's spawn."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and b"spawn_main" in cmdline:
                return int(entry.name)
        raise AssertionError("engine core process not found")

    def wait_exit(self, timeout: float) -> int:
        """The server's exit status, waiting up to `timeout` seconds for it."""
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
