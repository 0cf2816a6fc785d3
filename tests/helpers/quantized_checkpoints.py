"""Tiny pre-quantized checkpoints as they ship: compressed-tensors ones written by the
`compressed-tensors` library (llm-compressor's format), and `quant_method: fp8` ones
(float8_e4m3fn weights with per-tensor `weight_scale` or block `weight_scale_inv`).

    path = make_compressed_tensors_checkpoint(base, tmp_path / "w8a16", "W8A16")
    path = make_fp8_checkpoint(base, tmp_path / "fp8", block=(32, 32))
    weights = dequantized_linears(path)  # checkpoint name -> fp32 [N, K], as the file encodes it
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.helpers.tiny_checkpoints import load_hf_reference

FP8_MAX = 448.0
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _scheme(name: str):  # noqa: ANN202
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        preset_name_to_scheme,
    )

    if name == "W8A16":  # the preset is group-wise; this is the per-channel W8A16
        args = QuantizationArgs(num_bits=8, type="int", strategy="channel", symmetric=True,
                                dynamic=False)
        return QuantizationScheme(targets=["Linear"], weights=args)
    if name.startswith("W4A16-"):  # "W4A16-g32", "W4A16-channel-asym", ...: 4-bit int weights
        group = name.split("-")[1]
        args = QuantizationArgs(num_bits=4, type="int", symmetric=not name.endswith("-asym"),
                                strategy="channel" if group == "channel" else "group",
                                group_size=None if group == "channel" else int(group[1:]),
                                dynamic=False)
        return QuantizationScheme(targets=["Linear"], weights=args)
    return preset_name_to_scheme(name, ["Linear"])


def make_compressed_tensors_checkpoint(base: Path, path: Path, scheme: str,
                                       block: int = 32) -> Path:
    """`base` (a tiny HF-layout checkpoint) quantized with a compressed-tensors preset: "W8A16"
    (int8 per channel), "W8A8" (int8 per channel + dynamic int8 tokens), "FP8_DYNAMIC" (fp8 per
    channel + dynamic tokens), "FP8" (fp8 per tensor + static input scale) or "FP8_BLOCK"
    (fp8 per `block` x `block`), or 4-bit int weights packed by the library's
    pack-quantized compressor: "W4A16-g<size>" / "W4A16-channel", "-asym" with zero points;
    the LM head left out. Scales are min-max over each channel /
    tensor / block (what llm-compressor's observers compute)."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from compressed_tensors.quantization.utils import calculate_qparams

    model = load_hf_reference(base)
    sch = _scheme(scheme)
    if sch.weights.block_structure is not None:
        sch.weights.block_structure = [block, block]
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": sch},
                                                        ignore=["lm_head"]))
    for module in model.modules():
        if not hasattr(module, "weight_scale"):
            continue
        args, w = module.quantization_scheme.weights, module.weight.data
        strategy = str(getattr(args.strategy, "value", args.strategy))
        if strategy == "channel":
            lo, hi = w.amin(1, keepdim=True), w.amax(1, keepdim=True)
        elif strategy == "group":
            groups = w.reshape(w.shape[0], -1, args.group_size)
            lo, hi = groups.amin(2), groups.amax(2)
        elif strategy == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        else:  # block: pad to whole blocks, reduce each
            bn, bk = args.block_structure
            n, k = w.shape
            pad = torch.zeros(-(-n // bn) * bn, -(-k // bk) * bk)
            pad[:n, :k] = w
            blocks = pad.reshape(pad.shape[0] // bn, bn, pad.shape[1] // bk, bk)
            lo, hi = blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3))
        scale, zero = calculate_qparams(lo, hi, args)
        module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.reshape(module.weight_zero_point.shape))
        if hasattr(module, "input_scale"):  # static activation scale (calibration stand-in)
            module.input_scale.data.fill_(0.02)
    fmt = ("pack-quantized" if scheme.startswith("W4") else
           "int-quantized" if scheme.startswith("W8") else "float-quantized")
    compressor = ModelCompressor.from_pretrained_model(model, fmt)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(str(path))
    _copy_generation_config(base, path)
    return path


def make_fp8_checkpoint(base: Path, path: Path, block: tuple[int, int] | None = None) -> Path:
    """`base` with its decoder linears in transformers' `quant_method: fp8` format: e4m3
    weights with one `weight_scale` per tensor (plus an `input_scale`), or with block scales
    `weight_scale_inv` [ceil(N / bn), ceil(K / bk)] when `block` is given."""
    state = load_file(str(next(Path(base).glob("*.safetensors"))))
    out: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        module = name.removesuffix(".weight")
        if not (name.endswith(".weight") and module.rsplit(".", 1)[-1] in LINEARS):
            out[name] = w
            continue
        if block is None:
            scale = w.abs().amax() / FP8_MAX
            out[name] = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            out[module + ".weight_scale"] = scale.reshape(())
            out[module + ".input_scale"] = torch.tensor(0.02)
            continue
        bn, bk = block
        n, k = w.shape
        scale = torch.empty(-(-n // bn), -(-k // bk))
        q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
        for i in range(scale.shape[0]):
            for j in range(scale.shape[1]):
                tile = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
                s = tile.abs().amax().clamp(min=1e-12) / FP8_MAX
                scale[i, j] = s
                q[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = (tile / s).to(torch.float8_e4m3fn)
        out[name], out[module + ".weight_scale_inv"] = q, scale
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"))
    config = json.loads((Path(base) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme":
                                     "static" if block is None else "dynamic", "fmt": "e4m3"}
    if block is not None:
        config["quantization_config"]["weight_block_size"] = list(block)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    _copy_generation_config(base, path)
    return path


def _copy_generation_config(base: Path, path: Path) -> None:
    src = Path(base) / "generation_config.json"
    if src.is_file():
        shutil.copy(src, Path(path) / "generation_config.json")


def dequantized_linears(path: Path) -> dict[str, torch.Tensor]:
    """Each quantized linear's weight as the checkpoint encodes it (q x scale, fp32), by the
    checkpoint's module name."""
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    side = _dequantized_path(path)
    if side.is_file():  # GPTQ / AWQ: the weights as quantized before they were packed
        return load_file(str(side))
    out = _dequantized_int4(path, state)
    for name, q in state.items():
        if not name.endswith(".weight") or q.element_size() != 1:
            continue
        module = name.removesuffix(".weight")
        if module + ".weight_scale_inv" in state:  # blocks
            s = state[module + ".weight_scale_inv"]
            n, k = q.shape
            bn, bk = -(-n // s.shape[0]), -(-k // s.shape[1])
            full = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        else:
            s = state[module + ".weight_scale"].float()
            full = s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1, 1)
            if s.dim() == 2 and s.shape[1] > 1:  # compressed-tensors blocks
                n, k = q.shape
                bn, bk = -(-n // s.shape[0]), -(-k // s.shape[1])
                full = s.repeat_interleave(bn, 0)[:n].repeat_interleave(bk, 1)[:, :k]
        out[module] = q.float() * full
    return out


def _dequantized_int4(path: Path, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """pack-quantized 4-bit linears dequantized by the compressed-tensors library's own
    decompressor (fp32), by module name."""
    packed = [n.removesuffix(".weight_packed") for n in state if n.endswith(".weight_packed")]
    if not packed:
        return {}
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qcfg = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    (scheme,) = QuantizationConfig.model_validate(qcfg).config_groups.values()
    out = {}
    for module in packed:
        local = {k.removeprefix(module + "."): v for k, v in state.items()
                 if k.startswith(module + ".") and k.count(".") == module.count(".") + 1}
        local["weight_scale"] = local["weight_scale"].float()
        out[module] = PackedQuantizationCompressor.decompress(local, scheme)["weight"].float()
    return out


def make_dense_twin(quantized: Path, base: Path, path: Path) -> Path:
    """A full-precision checkpoint of `base`'s config whose quantized linears hold the weights
    `quantized` encodes (dequantized_linears), everything else `base`'s."""
    state = load_file(str(next(Path(base).glob("*.safetensors"))))
    for module, w in dequantized_linears(quantized).items():
        assert state[module + ".weight"].shape == w.shape, module
        state[module + ".weight"] = w.to(state[module + ".weight"].dtype).contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"))
    shutil.copy(Path(base) / "config.json", path / "config.json")
    _copy_generation_config(base, path)
    return path


# -- GPTQ and AWQ: no writer library here, so packed by their published layouts ---------------
# the decoder linears of checkpoints that fuse them: GLM's gate_up_proj, and the remote-code
# ChatGLM layout's (query_key_value = q|k|v, dense_h_to_4h = gate|up)
FUSED_LINEARS = ("gate_up_proj", "query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AWQ's word: nibble i holds column AWQ_PACK_ORDER[i]


def _rtn_int4(w: torch.Tensor, group: int, sym: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit as GPTQ / AWQ define it, per group of `group` inputs (0: the
    row): (q int64 0..15 [N, K], scale [N, G], zero int64 0..15 [N, G]), w ~= (q - zero) * s.
    Symmetric: zero 8, scale 2 * amax / 15; else scale (max - min) / 15 over a range holding 0."""
    n, k = w.shape
    g = k if group == 0 else group
    wg = w.float().reshape(n, k // g, g)
    if sym:
        amax = wg.abs().amax(2).clamp(min=1e-8)
        scale = 2 * amax / 15
        zero = torch.full_like(scale, 8, dtype=torch.int64)
    else:
        lo, hi = wg.amin(2).clamp(max=0), wg.amax(2).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-8)
        zero = torch.round(-lo / scale).long().clamp(0, 15)
    scale = scale.half().float()  # the checkpoints store fp16 scales
    q = (torch.round(wg / scale[..., None]).long() + zero[..., None]).clamp(0, 15)
    return q.reshape(n, k), scale, zero


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """[..., 8] values 0..15 -> int32 words, nibble i at bits 4i (two's complement)."""
    word = torch.zeros(nibbles.shape[:-1], dtype=torch.int64)
    for i in range(8):
        word |= nibbles[..., i] << (4 * i)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def _quantize_linears(base: Path, group: int, sym: bool):  # noqa: ANN202
    state = load_file(str(next(Path(base).glob("*.safetensors"))))
    for name, w in state.items():
        module = name.removesuffix(".weight")
        leaf = module.rsplit(".", 1)[-1]
        quantized = name.endswith(".weight") and (leaf in LINEARS or leaf in FUSED_LINEARS)
        yield name, module, w, (_rtn_int4(w, group, sym) if quantized else None)


def _write(path: Path, base: Path, out: dict[str, torch.Tensor], qcfg: dict,
           deq: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path / "model.safetensors"))
    config = json.loads((Path(base) / "config.json").read_text())
    config["quantization_config"] = qcfg
    (path / "config.json").write_text(json.dumps(config, indent=2))
    _copy_generation_config(base, path)
    # the weights the file encodes, kept beside the checkpoint (not in it) for the tests
    save_file(deq, str(_dequantized_path(path)))
    return path


def _dequantized_path(path: Path) -> Path:
    return Path(path).parent / f"{Path(path).name}.dequantized.safetensors"


def make_gptq_checkpoint(base: Path, path: Path, group: int = 32, sym: bool = True,
                         v1: bool = True) -> Path:
    """`base` with its decoder linears as AutoGPTQ / GPTQModel write 4-bit GPTQ (desc_act
    false): qweight int32 [K / 8, N] (word i of column n holds inputs 8i..8i+7, input 8i+j in
    nibble j), qzeros int32 [G, N / 8] (word i of group g holds rows 8i..8i+7 likewise; the v1
    format, `checkpoint_format: gptq`, stores zero - 1 in 4 bits), scales fp16 [G, N], g_idx
    int32 [K] = k // group. group 0: one group per row (group_size -1)."""
    out: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}
    for name, module, w, quant in _quantize_linears(base, group, sym):
        if quant is None:
            out[name] = w
            continue
        q, scale, zero = quant
        n, k = q.shape
        g = k if group == 0 else group
        out[module + ".qweight"] = _words(q.t().reshape(k // 8, 8, n).transpose(1, 2))
        stored = (zero - 1) & 15 if v1 else zero
        out[module + ".qzeros"] = _words(stored.t().reshape(-1, n // 8, 8))
        out[module + ".scales"] = scale.t().contiguous().half()
        out[module + ".g_idx"] = (torch.arange(k) // g).to(torch.int32)
        deq[module] = (q - zero.repeat_interleave(g, 1)).float() * scale.repeat_interleave(g, 1)
    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": group or -1, "desc_act": False,
            "sym": sym, "true_sequential": True, "damp_percent": 0.01, "static_groups": False,
            "lm_head": False, "checkpoint_format": "gptq" if v1 else "gptq_v2"}
    return _write(path, base, out, qcfg, deq)


def make_awq_checkpoint(base: Path, path: Path, group: int = 32) -> Path:
    """`base` with its decoder linears as AutoAWQ writes 4-bit GEMM AWQ: qweight int32
    [K, N / 8] and qzeros int32 [G, N / 8] packed along the outputs, word c holding columns
    8c..8c+7 in AWQ's interleaved order (nibble i: column 8c + AWQ_PACK_ORDER[i]), scales
    fp16 [G, N]; asymmetric (zero_point true)."""
    out: dict[str, torch.Tensor] = {}
    deq: dict[str, torch.Tensor] = {}
    order = torch.tensor(AWQ_PACK_ORDER)
    for name, module, w, quant in _quantize_linears(base, group, sym=False):
        if quant is None:
            out[name] = w
            continue
        q, scale, zero = quant
        n, k = q.shape
        out[module + ".qweight"] = _words(q.t().reshape(k, n // 8, 8)[..., order])
        out[module + ".qzeros"] = _words(zero.t().reshape(-1, n // 8, 8)[..., order])
        out[module + ".scales"] = scale.t().contiguous().half()
        deq[module] = (q - zero.repeat_interleave(group, 1)).float() * \
            scale.repeat_interleave(group, 1)
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
            "version": "gemm", "modules_to_not_convert": None}
    return _write(path, base, out, qcfg, deq)
