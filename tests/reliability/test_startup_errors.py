"""Startup errors are one line that names the flag, file or field (no traceback): a port out of
range, malformed config.json / tokenizer.json, a config.json that is not an object, and a
checkpoint chat template with a syntax error."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flatout.demo import ASSETS
from flatout.models.registry import resolve_model_config
from flatout.server.chat import resolve_chat_template
from flatout.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("port", ["99999", "-1", "eighty"])
def test_port_out_of_range_is_one_line(port: str) -> None:
    r = subprocess.run([sys.executable, "-m", "flatout", "serve", "--port", port], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--port" in lines[0] and "65535" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(("content", "why"), [
    ("[1, 2]", "must hold a JSON object, got list"),
    ('{"architectures": [', "is not valid JSON"),
    ("\xff\xfe", "is not valid JSON"),
])
def test_bad_config_json_names_the_file(tmp_path: Path, content: str, why: str) -> None:
    folder = tmp_path / "ck"
    folder.mkdir()
    (folder / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=why) as e:
        resolve_model_config(str(folder))
    assert str(folder / "config.json") in str(e.value)


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": 5}', "not json", "[]"])
def test_bad_tokenizer_json_names_the_file(tmp_path: Path, content: str) -> None:
    folder = tmp_path / "tok"
    shutil.copytree(ASSETS, folder)
    (folder / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError) as e:
        load_tokenizer(folder)
    assert str(folder / "tokenizer.json") in str(e.value)


def test_checkpoint_template_syntax_error_fails_at_startup_naming_the_file(
        tmp_path: Path) -> None:
    folder = tmp_path / "tpl"
    shutil.copytree(ASSETS, folder)
    (folder / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    tok = load_tokenizer(folder)
    with pytest.raises(ValueError, match="syntax error") as e:
        resolve_chat_template(None, tok, "Glm4ForCausalLM")
    assert str(folder / "chat_template.jinja") in str(e.value)
    # an override replaces the broken one, so the server can still start
    template, source = resolve_chat_template("{{ messages[0].content }}", tok, "Glm4ForCausalLM")
    assert source.startswith("--chat-template") and template == "{{ messages[0].content }}"
