"""Checkpoints that ship quantized: what their `quantization_config` says and how flatout serves it.

Two formats as they are published:
- `quant_method: fp8` (transformers' FP8 / fine-grained FP8 checkpoints): float8_e4m3fn weights
  with one scale per tensor (`weight_scale`) or per block of `weight_block_size`
  (`weight_scale_inv` [ceil(N / bn), ceil(K / bk)]);
- `quant_method: compressed-tensors` (llm-compressor), read through the `compressed-tensors`
  library's QuantizationConfig: symmetric 8-bit weights, int ("int-quantized": W8A16, W8A8
  INT8) or float ("float-quantized": W8A8 FP8), per channel (`weight_scale` [N, 1]) or per
  tensor ([1]), or float per block (`weight_scale` [ceil(N / bn), ceil(K / bk)]).

Per-tensor and per-channel weights load as they are (`weight` + per-row `weight_scale`, a
tensor's one scale repeated over its rows): the int8 ones serve as `int8` (W8A16; a W8A8 INT8
checkpoint's activations then stay 16-bit), the fp8 ones as `fp8` (activations quantized per
token at run time; a checkpoint's static `input_scale` is not used). Block-scaled FP8 weights are
dequantized on load and quantized again per output channel to the method served (fp8 unless
--quantization says int8). Anything else (4-bit, groups, zero points, a quantized LM head) is
refused at startup, naming what the checkpoint has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CheckpointQuantization:
    method: str  # what the weights are stored as: "int8" | "fp8"
    description: str  # for messages: "compressed-tensors int-quantized (channel)", ...
    # block-wise weight scales [bn, bk]: dequantized on load (then any method can be served)
    block_size: tuple[int, int] | None = None
    # the block scales' tensor, beside each weight (read with it)
    scale_name: str = "weight_scale_inv"

    def served_method(self, requested: str | None) -> str:
        """The --quantization to serve with: the checkpoint's, or what the user asked where
        the weights are requantized on load anyway."""
        if requested is None or requested == self.method:
            return self.method
        if self.block_size is not None:
            return requested
        raise ValueError(
            f"quantization: the checkpoint is {self.description} ({self.method} weights), "
            f"which cannot be served as {requested!r}; leave --quantization unset (or "
            f"{self.method}), or serve the bf16/fp16 original with --quantization {requested}"
        )


# checkpoint tensors of a quantized linear that flatout reads but does not use: static
# activation scales (flatout scales activations per token at run time)
UNUSED_SUFFIXES = (".input_scale",)


def parse_checkpoint_quantization(raw: dict[str, Any]) -> CheckpointQuantization | None:
    """The config.json's quantization, or None; ValueError for one flatout cannot serve."""
    qcfg = raw.get("quantization_config") or raw.get("compression_config")
    if not qcfg:
        return None
    if not isinstance(qcfg, dict):
        raise ValueError(f"quantization_config: expected an object, got {qcfg!r}")
    method = qcfg.get("quant_method")
    if method == "fp8":
        return _fp8_config(qcfg)
    if method == "compressed-tensors":
        return _compressed_tensors_config(qcfg)
    raise ValueError(
        f"quantization_config: quant_method {method!r} is not supported (supported: fp8, "
        f"compressed-tensors); serve the bf16/fp16 original with --quantization int8 or fp8"
    )


def _fp8_config(qcfg: dict[str, Any]) -> CheckpointQuantization:
    fmt = qcfg.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ValueError(f"quantization_config: fp8 fmt {fmt!r} is not supported (only e4m3)")
    block = qcfg.get("weight_block_size")
    if block is None:
        return CheckpointQuantization("fp8", "fp8 (per tensor)")
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise ValueError(f"quantization_config: weight_block_size must be [rows, cols], got "
                         f"{block!r}")
    return CheckpointQuantization("fp8", f"fp8 (blocks {block[0]}x{block[1]})",
                                  (block[0], block[1]))


def _compressed_tensors_config(qcfg: dict[str, Any]) -> CheckpointQuantization:
    from compressed_tensors.quantization import QuantizationConfig  # type: ignore[import-untyped]

    try:
        config = QuantizationConfig.model_validate(qcfg)
    except Exception as e:  # pydantic's ValidationError names the bad field
        raise ValueError(f"quantization_config: not a compressed-tensors config: {e}") from None
    fmt = str(getattr(config.format, "value", config.format))
    found: set[CheckpointQuantization] = set()
    for name, scheme in config.config_groups.items():
        w = scheme.weights
        if w is None:
            raise ValueError(f"quantization_config: group {name!r} quantizes no weights")
        kind = str(getattr(w.type, "value", w.type))
        strategy = str(getattr(w.strategy, "value", w.strategy))
        what = (f"compressed-tensors {scheme.format or fmt} group {name!r}: {w.num_bits}-bit "
                f"{kind} weights, {strategy} strategy"
                + ("" if w.symmetric else ", asymmetric"))
        if w.num_bits != 8 or not w.symmetric or kind not in ("int", "float") or (
            strategy not in ("channel", "tensor") and not (strategy == "block" and kind == "float")
        ):
            raise ValueError(
                f"quantization_config: {what} is not supported (flatout serves symmetric 8-bit "
                f"weights per channel or tensor, and FP8 per block)"
            )
        method = "int8" if kind == "int" else "fp8"
        block = None
        if strategy == "block":
            bs = w.block_structure or [128, 128]
            block = (int(bs[0]), int(bs[1]))
        found.add(CheckpointQuantization(method, f"compressed-tensors {fmt} ({strategy})", block,
                                         "weight_scale"))
    if len(found) != 1:
        raise ValueError(f"quantization_config: groups quantize differently "
                         f"({sorted(q.description for q in found)}); flatout serves one scheme")
    if not any(_ignores_lm_head(i) for i in config.ignore or []):
        raise ValueError("quantization_config: the LM head is quantized in this checkpoint "
                         "(not in `ignore`), which flatout does not load")
    return found.pop()


def _ignores_lm_head(entry: str) -> bool:
    return entry == "lm_head" or entry.endswith(".lm_head") or (
        entry.startswith("re:") and "lm_head" in entry)


def dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]
                      ) -> torch.Tensor:
    """Block-scaled weights to fp32: w[i, j] = q[i, j] * scale[i // bn, j // bk]."""
    n, k = q.shape
    bn, bk = block
    rows, cols = -(-n // bn), -(-k // bk)
    if tuple(scale.shape) != (rows, cols):
        raise ValueError(f"block scales have shape {tuple(scale.shape)}, expected "
                         f"{(rows, cols)} for a {(n, k)} weight in {bn}x{bk} blocks")
    full = scale.float().repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
    return q.float() * full
