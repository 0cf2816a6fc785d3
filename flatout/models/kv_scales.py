"""Per-tensor K/V cache scales from a checkpoint, for `--kv-cache-dtype fp8`.

Checkpoints calibrated for an fp8 KV cache (llm-compressor / compressed-tensors' kv_cache_scheme,
vLLM's fp8 format, NVIDIA ModelOpt) store one fp32 scalar per layer for K and one for V, named
`<layer>.self_attn.k_scale` / `v_scale` (ModelOpt: `<layer>.self_attn.k_proj.k_scale` /
`v_proj.v_scale`). They fill each attention layer's `k_scale` / `v_scale` buffer (1.0 where the
checkpoint has none); a cache in the model's dtype ignores them.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

# <layer>.self_attn[.k_proj|.v_proj].{k,v}_scale -> <layer>.self_attn.attn.{k,v}_scale
_KV_SCALE = re.compile(r"^(.*\.layers\.\d+\.self_attn)\.(?:(k|v)_proj\.)?(k|v)_scale$")


def kv_scale_targets(model: nn.Module, tensor_names: list[str]) -> dict[str, str]:
    """The checkpoint's K/V scale tensors, each mapped to the attention buffer it fills (names
    that look like scales but match no layer of this model are left to the weight plan)."""
    buffers = dict(model.named_buffers())
    targets: dict[str, str] = {}
    for name in tensor_names:
        m = _KV_SCALE.match(name)
        if m is None or (m.group(2) is not None and m.group(2) != m.group(3)):
            continue
        for prefix in ("", "model."):  # checkpoints of the bare decoder lack "model."
            buffer = f"{prefix}{m.group(1)}.attn.{m.group(3)}_scale"
            if buffer in buffers:
                targets[name] = buffer
                break
    return targets


@torch.no_grad()
def load_kv_scale(buffer: torch.Tensor, tensor: torch.Tensor, name: str) -> None:
    """Copy one checkpoint scale into its [] fp32 buffer; ValueError naming the tensor for a
    scale that is not one positive finite number (per-head scales are not supported)."""
    if tensor.numel() != 1:
        raise ValueError(
            f"{name}: a per-tensor K/V cache scale must hold one value, this one has shape "
            f"{tuple(tensor.shape)} (per-head KV scales are not supported)"
        )
    value = float(tensor.float().reshape(()))
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name}: a K/V cache scale must be positive and finite, got {value}")
    buffer.fill_(value)
