"""benchmarks/bench_vision_serve.py --quick: the whole GPU script at tiny scale on the CPU (a
dummy-weight demo-vl server under `flatout bench` with images, transformers' batched generate on
the same config, the image decoder's throughput), and what it writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_writes_the_table_and_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/bench_vision_serve.py", "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "bench_vision_serve.json").read_text())
    assert result["image_tokens"] == 32  # 112x224 -> 4 x 8 merged patches
    assert [r["concurrency"] for r in result["flatout"]] == [2, 4]
    for row in result["flatout"]:
        assert row["completed"] == row["num_prompts"] and row["failed"] == 0
        assert row["req_per_s"] > 0 and row["ttft_ms"]["mean"] > 0
        assert row["tpot_ms"]["p99"] is not None and row["engine_busy_perc"] is not None
        assert row["mean_prompt_tokens"] > 32  # the server counted the image's tokens
        assert (tmp_path / row["bench_json"]).is_file()
    hf = result["transformers"]
    assert hf["best"] is not None and hf["best"]["image_tokens"] == result["image_tokens"]
    assert all(r["new_tokens"] == 4 for r in hf["runs"] if "req_per_s" in r)
    assert set(result["decode"]["threads"]) == {"1", "8"}
    assert all(v["images_per_s"] > 0 for v in result["decode"]["threads"].values())
    table = (tmp_path / "bench_vision_serve.md").read_text()
    assert "| flatout | 2 |" in table and "| flatout | 4 |" in table
    assert "transformers" in table and "| threads | images/s |" in table


def test_served_checkpoint_is_the_preset_with_the_demo_vl_tokenizer(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_vision_serve import build_checkpoint

    from flatout.demo_vl import DEMO_VL_CONFIG
    from flatout.engine.input_processor import InputProcessor
    from flatout.models.presets import PRESETS
    from flatout.models.registry import resolve_model_config

    preset = PRESETS["autoglm-phone-9b"].config
    folder = build_checkpoint(preset, tmp_path / "ckpt")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["vision_config"] == preset["vision_config"]
    for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "rope_parameters"):
        assert cfg["text_config"][key] == preset["text_config"][key]
    assert cfg["text_config"]["vocab_size"] == DEMO_VL_CONFIG["text_config"]["vocab_size"]
    model = resolve_model_config(str(folder), load_format="dummy", device_type="cuda",
                                 max_model_len=8192)
    assert model.tokenizer == str(folder) and model.vision is not None
    assert model.vision.image_token_id == DEMO_VL_CONFIG["image_token_id"]
    from flatout.tokenizers.loader import load_tokenizer

    inputs = InputProcessor(model, load_tokenizer(str(folder)), cache_tokens=8192)
    assert inputs.image_placeholder == "<|begin_of_image|><|image|><|end_of_image|>"
