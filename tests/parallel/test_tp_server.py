"""`flatout serve --tensor-parallel-size N` on CPU (gloo): greedy tokens over HTTP equal the
offline engine's on one rank, and stopping the server leaves no worker behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import openai
import pytest

from flatout import LLM, SamplingParams
from tests.helpers.tiny_checkpoints import make_tiny_checkpoint
from tests.server.server_process import ServerProcess

PROMPTS = [[5, 17, 42, 99, 7, 150, 4], [200, 11, 12], list(range(20, 70))]


def _ids(logprobs: object) -> list[int]:
    return [int(t.removeprefix("token_id:")) for t in logprobs.tokens]  # type: ignore[attr-defined]


def _children(pid: int) -> set[int]:
    """Every descendant of `pid` (from /proc)."""
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in kids.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


@pytest.mark.parametrize(("arch", "tp"), [("GlmForCausalLM", 2), ("ChatGLMModel", 4)])
def test_greedy_over_http_with_tp_equals_one_rank(arch: str, tp: int, tmp_path: Path) -> None:
    path = make_tiny_checkpoint(arch, tmp_path / arch.lower())
    server = ServerProcess(["--model", str(path), "--num-kv-blocks", "64",
                            "--tensor-parallel-size", str(tp)], tmp_path / "log", wait=False)
    try:
        llm = LLM(str(path), num_kv_blocks=64)  # the oracle: one rank, computed meanwhile
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        expected = [o.token_ids for o in llm.generate(PROMPTS, params)]
        del llm
        server.wait()
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0)
        r = client.completions.create(model=arch.lower(), prompt=PROMPTS, max_tokens=10,
                                      temperature=0, logprobs=0, extra_body={"ignore_eos": True})
        assert [_ids(c.logprobs) for c in r.choices] == expected
        stream = client.completions.create(model=arch.lower(), prompt=PROMPTS[2], max_tokens=10,
                                           temperature=0, logprobs=0, stream=True,
                                           extra_body={"ignore_eos": True})
        streamed = [i for c in stream if c.choices[0].logprobs for i in _ids(c.choices[0].logprobs)]
        assert streamed == expected[2]
        tree = _children(server.proc.pid)
        assert len(tree) >= tp  # the engine core process and its tp - 1 workers (at least)
    finally:
        server.stop()


    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in tree):
        time.sleep(0.2)
    alive = [p for p in tree if Path(f"/proc/{p}").exists()
             and "zombie" not in Path(f"/proc/{p}/status").read_text()]
    assert not alive, f"processes left after the server stopped: {alive}"
