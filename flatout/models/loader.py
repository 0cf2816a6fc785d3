"""Fills a model's parameters from safetensors files, or with dummy random values.

One loader for every architecture: it asks the architecture's `WeightNameMap` where each
checkpoint tensor goes and hands the tensor to that parameter's `weight_loader`, which knows the
parameter's tensor-parallel sharding. Names are checked before any tensor is read, so a wrong
checkpoint fails in seconds, not after minutes of loading.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from flatout.layers.embedding import ParallelLMHead
from flatout.layers.linear import LinearBase, ShardId, get_shard_ids, get_weight_loader
from flatout.layers.norm import LayerNorm, RMSNorm
from flatout.layers.quantization import is_filled_with_weight
from flatout.models.kv_scales import kv_scale_targets, load_kv_scale
from flatout.models.prequantized import (
    INT4_TENSORS,
    UNUSED_SUFFIXES,
    CheckpointQuantization,
    convert_int4,
    dequantize_blocks,
)
from flatout.models.weight_names import Target, WeightNameMap

INDEX_FILE = "model.safetensors.index.json"
DUMMY_WEIGHT_RANGE = 1e-3


class CheckpointError(ValueError):
    """The checkpoint does not fit the model: missing, unexpected or misshapen tensors."""


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: those named by the index, else all in the folder."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} names files that do not exist: {absent}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in folder.glob("*.bin")) + sorted(
            p.name for p in folder.glob("*.pt")
        )
        hint = f" (found {other[:3]}: only safetensors is supported)" if other else ""
        raise CheckpointError(f"no *.safetensors files in {folder}{hint}")
    return files


def _summarise(names: list[str], limit: int = 8) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def plan_weight_loading(
    model: nn.Module, tensor_names: list[str], name_map: WeightNameMap, tied_lm_head: bool,
    scales_in_checkpoint: bool = False,
) -> dict[str, Target]:
    """Where each checkpoint tensor goes (dropped ones are left out).

    Quantized layers' scales are filled with their weights unless `scales_in_checkpoint` (a
    pre-quantized checkpoint), when they are checkpoint tensors like any other.
    Raises CheckpointError naming unexpected tensors and parameters nothing fills."""
    params = dict(model.named_parameters())  # tied lm_head.weight appears once, as the embedding
    plan: dict[str, Target] = {}
    unexpected: list[str] = []
    for name in tensor_names:
        # checkpoints saved from the bare decoder lack the "model." prefix
        candidates = [name] if name.startswith("model.") else [name, f"model.{name}"]
        target: Target | None = None
        dropped = False
        for candidate in candidates:
            t = name_map.resolve(candidate)
            if t is None or (tied_lm_head and t.param == "lm_head.weight"):
                dropped = True  # a tied head is the embedding: its copy in the file is redundant
                break
            if t.param in params:
                target = t
                break
        if target is not None:
            plan[name] = target
        elif not dropped:
            unexpected.append(name)
    if unexpected:
        raise CheckpointError(
            f"checkpoint has tensors this model does not use: {_summarise(sorted(unexpected))}"
        )
    filled: dict[str, set[ShardId | None]] = defaultdict(set)
    for t in plan.values():
        filled[t.param].add(t.shard_id)
    missing = []
    for pname, param in params.items():
        if is_filled_with_weight(param) and not scales_in_checkpoint:
            continue
        got = filled.get(pname, set())
        needed = set(get_shard_ids(param))
        if None not in got and not (needed and needed <= got):
            lacking = sorted(str(s) for s in needed - got) if needed and got else []
            missing.append(f"{pname} (shards {lacking})" if lacking else pname)
    if missing:
        raise CheckpointError(f"checkpoint lacks tensors for: {_summarise(missing)}")
    return plan


def int4_modules(names: list[str], packing: str) -> dict[str, dict[str, str]]:
    """The 4-bit linears of a checkpoint: module -> {tensor suffix: checkpoint name}, for each
    module with a packed weight (the first of INT4_TENSORS[packing])."""
    suffixes = INT4_TENSORS[packing]
    modules: dict[str, dict[str, str]] = {
        n.removesuffix("." + suffixes[0]): {} for n in names if n.endswith("." + suffixes[0])
    }
    for n in names:
        module, _, suffix = n.rpartition(".")
        if suffix in suffixes and module in modules:
            modules[module][suffix] = n
    return modules


@torch.no_grad()
def load_safetensors_weights(
    model: nn.Module, folder: str | Path, name_map: WeightNameMap, tied_lm_head: bool = False,
    quantized: CheckpointQuantization | None = None,
) -> None:
    """Fill every parameter of `model` from the checkpoint folder (`quantized`: the
    checkpoint's own quantization, models/prequantized.py)."""
    files = checkpoint_files(folder)
    names_by_file: dict[Path, list[str]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            names_by_file[path] = list(f.keys())
    file_of = {n: path for path, names in names_by_file.items() for n in names}
    skipped: tuple[str, ...] = ()
    block = quantized.block_size if quantized is not None else None
    if quantized is not None:  # consumed with their weights (block scales), or unused
        skipped = UNUSED_SUFFIXES + (("." + quantized.scale_name,) if block else ())
    all_names = [n for n in file_of if not n.endswith(skipped)]
    # 4-bit linears: their packed tensors are read together and converted to flatout's layout,
    # which the plan sees as <module>.weight / .weight_scale (/ .weight_zero_point)
    int4 = quantized.int4 if quantized is not None else None
    modules: dict[str, dict[str, str]] = {}
    layout: tuple[str, ...] = ()
    parts: set[str] = set()  # the checkpoint's tensors of those linears, read with them
    if int4 is not None:
        assert quantized is not None and quantized.int4_packing is not None
        modules = int4_modules(all_names, quantized.int4_packing)
        parts = {n for m in modules.values() for n in m.values()}
        all_names = [n for n in all_names if n not in parts]
        layout = ("weight", "weight_scale") + (("weight_zero_point",) if int4.zero_point
                                               else ())
        all_names += [f"{module}.{out}" for module in modules for out in layout]
    kv_scales = kv_scale_targets(model, all_names)  # buffers, not parameters: loaded apart
    plan = plan_weight_loading(model, [n for n in all_names if n not in kv_scales], name_map,
                               tied_lm_head,
                               scales_in_checkpoint=quantized is not None and block is None)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    # read straight onto the parameters' device: one tensor at a time in flight, sliced there
    device = str(next(iter(params.values())).device)
    with contextlib.ExitStack() as stack:
        opened = {p: stack.enter_context(safe_open(p, framework="pt", device=device))
                  for p in files}
        for module, tensors in modules.items():
            assert quantized is not None

            def read(suffix: str, tensors: dict[str, str] = tensors) -> torch.Tensor | None:
                name = tensors.get(suffix)
                return None if name is None else opened[file_of[name]].get_tensor(name)

            try:
                parts_of = convert_int4(quantized, read)
            except ValueError as e:
                raise CheckpointError(f"4-bit weight {module}: {e}") from None
            for out, tensor in zip(layout, parts_of, strict=False):
                target = plan.get(f"{module}.{out}")
                if target is None or tensor is None:
                    continue
                param = params[target.param]
                try:
                    get_weight_loader(param)(param, tensor, target.shard_id)
                except ValueError as e:
                    raise CheckpointError(f"4-bit weight {module} -> {target.param}: {e}"
                                          ) from None
        for path, names in names_by_file.items():
            for name in names:
                if name in kv_scales:
                    try:
                        load_kv_scale(buffers[kv_scales[name]], opened[path].get_tensor(name), name)
                    except ValueError as e:
                        raise CheckpointError(f"{path.name}: {e}") from None
                    continue
                target = plan.get(name)
                if target is None or name in parts:
                    continue
                param = params[target.param]
                loader = get_weight_loader(param)
                try:
                    tensor = opened[path].get_tensor(name)
                    if block is not None and tensor.dtype == torch.float8_e4m3fn:
                        assert quantized is not None
                        scale_name = name.removesuffix("weight") + quantized.scale_name
                        if scale_name not in file_of:
                            raise ValueError(f"no {scale_name} for this block-scaled weight")
                        scale = opened[file_of[scale_name]].get_tensor(scale_name)
                        tensor = dequantize_blocks(tensor, scale, block)
                    loader(param, tensor, target.shard_id)
                except ValueError as e:
                    raise CheckpointError(
                        f"{path.name}: tensor {name} -> {target.param}: {e}"
                    ) from None


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights at the real shapes without reading files (benchmarks, profiling).

    Norm weights are 1 (LayerNorm biases 0) and everything else is uniform in +-1e-3:
    activations stay small and finite in every dtype, so timings are those of real data paths."""
    norms = [m for m in model.modules() if isinstance(m, RMSNorm | LayerNorm)]
    norm_weights = {id(m.weight) for m in norms}
    norm_biases = {id(m.bias) for m in norms if isinstance(m, LayerNorm)}
    generators: dict[torch.device, torch.Generator] = {}

    def generator(device: torch.device) -> torch.Generator:
        gen = generators.get(device)
        if gen is None:
            gen = generators[device] = torch.Generator(device).manual_seed(seed)
        return gen

    filled: set[int] = set()
    for module in model.modules():  # quantized layers: random values quantized as on load
        if isinstance(module, LinearBase | ParallelLMHead) and module.weight_scale is not None:
            module.fill_dummy(-DUMMY_WEIGHT_RANGE, DUMMY_WEIGHT_RANGE,
                              generator(module.weight.device))
            filled |= {id(module.weight), id(module.weight_scale)}
            zero = getattr(module, "weight_zero_point", None)
            if zero is not None:
                filled.add(id(zero))
    for param in model.parameters():
        if id(param) in filled:
            continue
        if id(param) in norm_weights or id(param) in norm_biases:
            param.fill_(1.0 if id(param) in norm_weights else 0.0)
            continue
        param.uniform_(-DUMMY_WEIGHT_RANGE, DUMMY_WEIGHT_RANGE, generator=generator(param.device))
