"""The command line: info from a preset without files, generate on the demo model."""

from __future__ import annotations

import re

import pytest

from flatout import LLM, SamplingParams
from flatout.cli import main


def test_info_glm_4_9b_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "glm-4-9b"]) == 0
    out = capsys.readouterr().out
    params = int(re.search(r"\(([\d,]+)\)", out).group(1).replace(",", ""))
    assert 9.3e9 < params < 9.5e9
    assert "40.0 KiB per token" in out  # 2 (K,V) x 40 layers x 2 kv heads x 128 x 2 bytes
    assert "18.80 GB" in out
    assert main(["info", "--model", "glm-4-9b", "--kv-cache-dtype", "fp8"]) == 0
    assert "KV cache: 20.0 KiB per token in float8_e4m3fn" in capsys.readouterr().out


def test_info_unknown_model_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--model", "no-such-model-or-folder"]) == 2
    assert "error" in capsys.readouterr().err


def test_generate_prints_the_offline_completion(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--max-tokens", "8", "--temperature", "0", "Hello there"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    expected = LLM().generate("Hello there", SamplingParams(max_tokens=8, temperature=0))[0].text
    assert printed == expected
