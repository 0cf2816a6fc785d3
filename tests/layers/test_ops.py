"""The choice of op implementations: made once, when a layer is built, by device; on the CPU
the PyTorch references run and triton is never imported."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from flatout.kernels import reference
from flatout.kernels.ops import REFERENCE_OPS, ops_for
from flatout.layers.activation import SiluAndMul
from flatout.layers.attention import Attention
from flatout.layers.norm import RMSNorm
from flatout.layers.rotary import RotaryEmbedding
from tests.helpers.tiny_checkpoints import make_tiny_checkpoint


def test_cpu_layers_hold_the_references() -> None:
    assert ops_for("cpu") is REFERENCE_OPS and ops_for() is REFERENCE_OPS
    assert REFERENCE_OPS.rms_norm is reference.rms_norm
    layers = [RMSNorm(8, 1e-6), SiluAndMul(), Attention(2, 1, 4, 0.5),
              RotaryEmbedding(4, 4, 16, 10000.0, interleaved=False)]  # fmt: skip
    assert all(layer.ops is REFERENCE_OPS for layer in layers)


def test_cpu_model_forward_never_imports_triton(tmp_path) -> None:
    path = make_tiny_checkpoint("LlamaForCausalLM", tmp_path / "m")
    code = textwrap.dedent(f"""
        import sys
        import torch
        from flatout.layers.attention import AttentionMetadata, forward_context
        from flatout.models.registry import load_model, resolve_model_config

        model = load_model(resolve_model_config({str(path)!r}), torch.device("cpu"))
        meta = AttentionMetadata.for_prefill_without_cache([4])
        with torch.inference_mode(), forward_context(meta):
            model(torch.tensor([1, 2, 3, 4]), torch.arange(4))
        assert "triton" not in sys.modules, sorted(m for m in sys.modules if "triton" in m)
    """)
    subprocess.run([sys.executable, "-c", code], check=True)

