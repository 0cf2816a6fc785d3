"""A bounded schemathesis run against the served /openapi.json: no 5xx, no response that breaks
the schema (bodies, SSE events, content types, status codes), and every request the schema
forbids rejected with a 4xx. The README gives the longer command to run by hand."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.reliability.conftest import API_KEY
from tests.server.server_process import ServerProcess

# negative_data_rejection: a body the published schema forbids must be a 4xx (a message's content
# is required by role alike in /openapi.json and in the server: protocol.ChatMessage)
CHECKS = ("not_a_server_error,negative_data_rejection,status_code_conformance,"
          "content_type_conformance,response_schema_conformance,response_headers_conformance")


def _st() -> str:
    beside = Path(sys.executable).with_name("st")
    found = str(beside) if beside.exists() else shutil.which("st")
    if found is None:
        pytest.fail("schemathesis is not installed: pip install -e '.[test]'")
    return found


def test_schemathesis_finds_nothing(hardened: ServerProcess, tmp_path: Path) -> None:
    cmd = [_st(), "run", f"{hardened.url}/openapi.json", "--checks", CHECKS,
           "--header", f"Authorization: Bearer {API_KEY}", "--phases", "examples,fuzzing",
           "--max-examples", "50", "--seed", "20260601", "--workers", "1",
           "--request-timeout", "60", "--suppress-health-check", "all", "--no-color"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    counts = re.search(r"(\d+) generated, (\d+) passed", r.stdout)
    assert counts is not None, r.stdout[-2000:]
    generated, passed = map(int, counts.groups())
    assert generated == passed and generated >= 100, r.stdout[-2000:]
