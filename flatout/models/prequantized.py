"""Checkpoints that ship quantized: what their `quantization_config` says and how flatout serves it.

The formats as they are published:
- `quant_method: fp8` (transformers' FP8 / fine-grained FP8 checkpoints): float8_e4m3fn weights
  with one scale per tensor (`weight_scale`) or per block of `weight_block_size`
  (`weight_scale_inv` [ceil(N / bn), ceil(K / bk)]);
- `quant_method: compressed-tensors` (llm-compressor), read through the `compressed-tensors`
  library's QuantizationConfig: symmetric 8-bit weights, int ("int-quantized": W8A16, W8A8
  INT8) or float ("float-quantized": W8A8 FP8), per channel (`weight_scale` [N, 1]) or per
  tensor ([1]), or float per block (`weight_scale` [ceil(N / bn), ceil(K / bk)]); and 4-bit int
  weights ("pack-quantized": W4A16) per group or channel, symmetric or with zero points:
  `weight_packed` int32 [N, ceil(K / 8)] (eight values + 8 a word along K, the first in the
  low bits), `weight_scale` [N, G], `weight_shape` [N, K] and, when asymmetric,
  `weight_zero_point` int32 [ceil(N / 8), G] (values + 8 packed along N);
- `quant_method: gptq` (AutoGPTQ / GPTQModel; bits 4, desc_act false): `qweight` int32
  [K / 8, N] packed along K, `qzeros` int32 [G, N / 8] packed along N (the v1 format,
  `checkpoint_format: gptq`, stores zero - 1; gptq_v2 the zero), `scales` [G, N], `g_idx` [K]
  (checked to be k // group); symmetric ones carry zeros of 8;
- `quant_method: awq` (AutoAWQ, version gemm): `qweight` int32 [K, N / 8] and `qzeros` [G, N / 8]
  packed along N in AWQ's interleaved order (nibble i of a word: column AWQ_ORDER[i]),
  `scales` [G, N]; always with zero points.

Per-tensor and per-channel 8-bit weights load as they are (`weight` + per-row `weight_scale`, a
tensor's one scale repeated over its rows): the int8 ones serve as `int8` (W8A16; a W8A8 INT8
checkpoint's activations then stay 16-bit), the fp8 ones as `fp8` (activations quantized per
token at run time; a checkpoint's static `input_scale` is not used). Block-scaled FP8 weights are
dequantized on load and quantized again per output channel to the method served (fp8 unless
--quantization says int8). 4-bit weights of every packing are converted on load (`convert_int4`)
to flatout's own layout (layers/quantization.py: values two per byte along K, fp32 scales and
uint8 zero points [N, G]) and served as `w4a16-g<group>[-asym]` / `w4a16-channel[-asym]`, with
w = (q - zero) * scale exactly as the checkpoint encodes it. Anything else (other bit widths,
act-order groups, groups that are not a multiple of 32, a quantized LM head, ...) is refused at
startup, naming what the checkpoint has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from flatout.layers.quantization import INT4_METHOD, Int4Format

# the tensors of one 4-bit linear, per packing; the first is the packed weight, then its
# scales, zero points and what else ships beside them
INT4_TENSORS = {
    "compressed-tensors": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape"),
    "gptq": ("qweight", "scales", "qzeros", "g_idx"),
    "awq": ("qweight", "scales", "qzeros"),
}


@dataclass(frozen=True)
class CheckpointQuantization:
    method: str  # what the weights are stored as: "int8" | "fp8" | "w4a16-g128[-asym]" ...
    description: str  # for messages: "compressed-tensors int-quantized (channel)", ...
    # block-wise weight scales [bn, bk]: dequantized on load (then any method can be served)
    block_size: tuple[int, int] | None = None
    # the block scales' tensor, beside each weight (read with it)
    scale_name: str = "weight_scale_inv"
    # 4-bit weights: how they are packed (a key of INT4_TENSORS), converted on load to
    # flatout's layout (`convert_int4`)
    int4_packing: str | None = None
    int4_group_size: int = 0  # inputs per scale (0: per channel)
    int4_zero_point: bool = False
    gptq_zeros_minus_one: bool = False  # GPTQ's v1 checkpoint format stores zero - 1

    @property
    def int4(self) -> Int4Format | None:
        if self.int4_packing is None:
            return None
        return Int4Format(self.int4_group_size, self.int4_zero_point)

    def served_method(self, requested: str | None) -> str:
        """The --quantization to serve with: the checkpoint's, or what the user asked where
        the weights are requantized on load anyway."""
        if requested is None or requested == self.method:
            return self.method
        if self.int4_packing is not None and requested == INT4_METHOD:
            return self.method  # "w4a16": the checkpoint's groups and zero points
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


def _int4(packing: str, description: str, group_size: int, zero_point: bool,
          minus_one: bool = False) -> CheckpointQuantization:
    if group_size % 32:
        raise ValueError(f"quantization_config: {description}: group size {group_size} is not "
                         "supported (flatout serves groups of a multiple of 32 inputs, or one "
                         "scale per channel)")
    method = Int4Format(group_size, zero_point).method
    return CheckpointQuantization(method, description, int4_packing=packing,
                                  int4_group_size=group_size, int4_zero_point=zero_point,
                                  gptq_zeros_minus_one=minus_one)


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
    if method == "gptq":
        return _gptq_config(qcfg)
    if method == "awq":
        return _awq_config(qcfg)
    raise ValueError(
        f"quantization_config: quant_method {method!r} is not supported (supported: fp8, "
        f"compressed-tensors, gptq, awq); serve the bf16/fp16 original with --quantization "
        f"int8 or fp8"
    )


def _field(qcfg: dict[str, Any], name: str, default: Any, allowed: tuple[Any, ...], what: str
           ) -> Any:
    value = qcfg.get(name, default)
    if value not in allowed:
        raise ValueError(f"quantization_config: {what} {name}={value!r} is not supported "
                         f"(flatout serves {' or '.join(repr(a) for a in allowed)})")
    return value


def _group_size(qcfg: dict[str, Any], what: str) -> int:
    group = qcfg.get("group_size", 128)
    if not isinstance(group, int) or isinstance(group, bool) or (group <= 0 and group != -1):
        raise ValueError(f"quantization_config: {what} group_size={group!r} is not supported "
                         "(a positive multiple of 32, or -1 for one scale per channel)")
    return 0 if group == -1 else group


def _gptq_config(qcfg: dict[str, Any]) -> CheckpointQuantization:
    """GPTQ (AutoGPTQ / GPTQModel): qweight int32 [K / 8, N] packed along K, qzeros int32
    [G, N / 8] packed along N (the v1 format stores zero - 1), scales [G, N], g_idx [K]."""
    _field(qcfg, "bits", 4, (4,), "gptq")
    _field(qcfg, "desc_act", False, (False,), "gptq (act-order: g_idx permutes the groups)")
    sym = _field(qcfg, "sym", True, (True, False), "gptq")
    fmt = _field(qcfg, "checkpoint_format", "gptq", ("gptq", "gptq_v2"), "gptq")
    if qcfg.get("lm_head"):
        raise ValueError("quantization_config: lm_head=true: the LM head is quantized in this "
                         "checkpoint, which flatout does not load")
    group = _group_size(qcfg, "gptq")
    return _int4("gptq", f"gptq 4-bit ({'channel' if not group else f'groups of {group}'}"
                 f"{'' if sym else ', asymmetric'})", group, not sym, minus_one=fmt == "gptq")


def _awq_config(qcfg: dict[str, Any]) -> CheckpointQuantization:
    """AWQ (AutoAWQ, version gemm): qweight int32 [K, N / 8] and qzeros [G, N / 8] packed
    along N in AWQ's interleaved nibble order, scales [G, N]."""
    bits = qcfg.get("bits", qcfg.get("w_bit", 4))
    if bits != 4:
        raise ValueError(f"quantization_config: awq bits={bits!r} is not supported (4)")
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config: awq version={qcfg.get('version')!r} is not "
                         "supported (flatout reads the 'gemm' packing)")
    _field(qcfg, "zero_point", True, (True,), "awq")
    group = _group_size({"group_size": qcfg.get("group_size", qcfg.get("q_group_size", 128))},
                        "awq")
    return _int4("awq", f"awq 4-bit gemm (groups of {group})" if group else
                 "awq 4-bit gemm (channel)", group, True)


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
        if w.num_bits == 4 and (scheme.format or fmt) == "pack-quantized":
            found.add(_compressed_tensors_int4(what, w, kind, strategy, scheme))
            continue
        if w.num_bits != 8 or not w.symmetric or kind not in ("int", "float") or (
            strategy not in ("channel", "tensor") and not (strategy == "block" and kind == "float")
        ):
            raise ValueError(
                f"quantization_config: {what} is not supported (flatout serves symmetric 8-bit "
                f"weights per channel or tensor, FP8 per block, and pack-quantized 4-bit int "
                f"weights per group or channel)"
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


def _compressed_tensors_int4(what: str, w: Any, kind: str, strategy: str, scheme: Any
                             ) -> CheckpointQuantization:
    """pack-quantized 4-bit int weights: weight_packed int32 [N, ceil(K / 8)] (8 nibbles per
    word along K, value + 8), weight_scale [N, G], weight_shape [2], and when asymmetric
    weight_zero_point int32 [ceil(N / 8), G] (packed along N, value + 8)."""
    if kind != "int" or strategy not in ("group", "channel") or w.dynamic or (
            scheme.input_activations is not None):
        raise ValueError(f"quantization_config: {what}"
                         + (", quantized activations" if scheme.input_activations else "")
                         + " is not supported (flatout serves 4-bit int weights per group or "
                         "channel with 16-bit activations)")
    group = int(w.group_size) if strategy == "group" else 0
    return _int4("compressed-tensors", f"compressed-tensors pack-quantized ({strategy}"
                 + (f" {group}" if group else "") + (", asymmetric" if not w.symmetric else "")
                 + ")", group, not w.symmetric)


def _unpack_nibbles(packed: torch.Tensor, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, C] of 8 nibbles each (nibble i at bits 4i) -> uint8 [R, 8C]; with `order`,
    nibble i holds the value of column order[i] of its word's 8 (AWQ's interleaving)."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    vals = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & 15  # [R, C, 8]
    if order is not None:
        vals = vals[..., torch.argsort(torch.tensor(order, device=packed.device))]
    return vals.to(torch.uint8).reshape(packed.shape[0], -1)


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column AWQ_ORDER[i]

Int4Parts = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]


def convert_int4(quant: CheckpointQuantization, read: Callable[[str], torch.Tensor | None]
                 ) -> Int4Parts:
    """One 4-bit linear of the checkpoint (`read(suffix)`: its tensor, or None where absent)
    in flatout's layout: (q uint8 0..15 [N, K], fp32 scale [N, G], uint8 zero [N, G] or None)
    with w = (q - zero) * scale (zero 8 when None). ValueError naming what does not fit."""
    fmt = quant.int4
    assert fmt is not None and quant.int4_packing is not None
    names = INT4_TENSORS[quant.int4_packing]
    packed, scale_raw = read(names[0]), read(names[1])
    if packed is None or scale_raw is None:
        raise ValueError(f"a 4-bit weight needs {names[0]} and {names[1]}")
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(f"{names[0]} must be int32 [rows, cols], got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    zero_raw = read(names[2])
    zero: torch.Tensor | None = None
    if quant.int4_packing == "compressed-tensors":
        shape = read("weight_shape")
        if shape is None or shape.numel() != 2:
            raise ValueError("a pack-quantized weight needs its weight_shape [N, K]")
        n, k = (int(v) for v in shape.tolist())
        if tuple(packed.shape) != (n, -(-k // 8)):
            raise ValueError(f"weight_packed has shape {tuple(packed.shape)}, expected "
                             f"{(n, -(-k // 8))} for a {(n, k)} weight")
        q = _unpack_nibbles(packed)[:, :k]
        scale = scale_raw.float().reshape(n, -1)
        if zero_raw is not None:
            zero = _unpack_nibbles(zero_raw.t().contiguous())[:, :n].t()  # packed along N
    elif quant.int4_packing == "gptq":
        q = _unpack_nibbles(packed.t().contiguous())  # [N, K]: qweight packs along K
        scale = scale_raw.float().t()
        n = q.shape[0]
        if zero_raw is not None:
            zero = _unpack_nibbles(zero_raw)[:, :n].t()
            if quant.gptq_zeros_minus_one:  # v1: stored zero - 1 (in 4 bits)
                zero = (zero + 1) & 15
        g_idx = read("g_idx")
        if g_idx is not None:
            k, groups = q.shape[1], scale.shape[1]
            if not torch.equal(g_idx.long().cpu(), torch.arange(k) // (k // groups)):
                raise ValueError("g_idx is not in input order (act-order / desc_act weights "
                                 "are not supported)")
    else:  # awq: both pack along N, interleaved
        q = _unpack_nibbles(packed, AWQ_ORDER).t()  # [K, N] -> [N, K]
        scale = scale_raw.float().t()
        if zero_raw is None:
            raise ValueError("an AWQ weight needs its qzeros")
        zero = _unpack_nibbles(zero_raw, AWQ_ORDER)[:, :scale.shape[0]].t()
    n, k = q.shape
    groups = 1 if fmt.group_size == 0 else -(-k // fmt.group_size)
    if fmt.group_size and k % fmt.group_size:
        raise ValueError(f"{k} inputs are not whole groups of {fmt.group_size}")
    if tuple(scale.shape) != (n, groups):
        raise ValueError(f"{names[1]} has {tuple(scale_raw.shape)}, expected {groups} scales "
                         f"for each of the {n} rows")
    if zero is not None and tuple(zero.shape) != (n, groups):
        raise ValueError(f"{names[2]} unpacks to {tuple(zero.shape)}, expected {(n, groups)}")
    if not fmt.zero_point:
        if zero is not None and not bool((zero == 8).all()):  # GPTQ sym ships zeros of 8
            raise ValueError(f"{names[2]}: symmetric weights with zero points other than 8")
        zero = None
    elif zero is None:
        raise ValueError(f"asymmetric 4-bit weights need {names[2]}")
    return q.contiguous(), scale.contiguous(), None if zero is None else zero.contiguous()


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
