"""Linear layers sharded for tensor parallelism.

Every parameter carries `weight_loader(param, loaded, shard_id=None)`, which copies a full
(unsharded) checkpoint tensor into this rank's slice. Layers whose output stacks several
checkpoint tensors (q|k|v, gate|up) accept each part with its shard id, or the fused tensor with
`shard_id=None`: the fused tensor is split into its parts first and each part is then sharded, so
rank r holds [q_r | k_r | v_r], never a contiguous slice of the fused rows.

With `quantization` ("int8" | "fp8") a layer holds its weight in that format (layers/
quantization.py: int8 / e4m3 `weight` plus a per-output-channel `weight_scale`), quantized as the
checkpoint's rows arrive, and multiplies through the format's kernel; nothing else changes.
With a 4-bit method ("w4a16...") the weight is packed uint8 [out, in / 2] with per-group
`weight_scale` [out, groups] (and `weight_zero_point` when asymmetric): the rows of all three
shard together, and a row-parallel layer keeps its inputs' whole groups.

Column-parallel layers split output features across ranks and need no communication; a
row-parallel layer splits input features and all-reduces its output, or leaves that reduce to
the next norm as a `PendingReduce`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from flatout import distributed
from flatout.distributed import PendingReduce
from flatout.kernels.ops import ops_for
from flatout.kernels.reference import pack_int4
from flatout.layers.quantization import Int4Format, mark_filled_with_weight, weight_format

ShardId = int | str


class WeightLoader(Protocol):
    """Copies a full checkpoint tensor (or one shard id's part of it) into a parameter."""

    def __call__(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId | None = None
    ) -> None: ...


# attributes the layers set on their parameters, read by the checkpoint loader (models/loader.py)
_WEIGHT_LOADER = "weight_loader"
_SHARD_IDS = "shard_ids"


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> None:
    setattr(param, _WEIGHT_LOADER, loader)


def get_weight_loader(param: nn.Parameter) -> WeightLoader:
    """The parameter's loader; `default_weight_loader` where its layer set none."""
    loader: WeightLoader = getattr(param, _WEIGHT_LOADER, default_weight_loader)
    return loader


def set_shard_ids(param: nn.Parameter, shard_ids: tuple[ShardId, ...]) -> None:
    setattr(param, _SHARD_IDS, shard_ids)


def get_shard_ids(param: nn.Parameter) -> tuple[ShardId, ...]:
    """The shard ids a fused parameter is filled from (empty: loaded whole)."""
    shard_ids: tuple[ShardId, ...] = getattr(param, _SHARD_IDS, ())
    return shard_ids


def new_parameter(*shape: int) -> nn.Parameter:
    """Uninitialised inference parameter in the current default dtype and device."""
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


def copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch: expected {tuple(dst.shape)}, got {tuple(src.shape)}")
    dst.copy_(src)


def default_weight_loader(
    param: torch.Tensor, loaded: torch.Tensor, shard_id: ShardId | None = None
) -> None:
    """Loader of replicated parameters (norm weights): the whole tensor, as is."""
    if shard_id is not None:
        raise ValueError(f"unsharded parameter got shard id {shard_id!r}")
    copy_checked(param.data, loaded)


def _divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) is not divisible by tensor-parallel size {parts}")
    return total // parts


class LinearBase(nn.Module):
    """A linear layer's parameters, W: [out_per_rank, in_per_rank] (+ its per-row scale when
    quantized; 4-bit: packed [out_per_rank, in_per_rank / 2] + per-group scales and zero
    points) and b; each subclass loads and applies them."""

    weight_zero_point: nn.Parameter | None  # 4-bit asymmetric weights only
    splits_input = False  # row-parallel: each rank holds in_per_rank of tp_size x as many inputs

    def __init__(
        self, in_per_rank: int, out_per_rank: int, bias: bool, quantization: str | None = None
    ) -> None:
        super().__init__()
        self.tp_rank = distributed.get_tp_rank()
        self.tp_size = distributed.get_tp_size()
        self.ops = ops_for()
        self.params_dtype = torch.get_default_dtype()  # the model dtype (of x, y and the bias)
        self.in_per_rank = in_per_rank
        self.weight_format = weight_format(quantization)
        self.weight_scale: nn.Parameter | None
        self.register_parameter("weight_zero_point", None)
        self.int4: Int4Format | None = None
        if self.weight_format is None:
            self.weight = new_parameter(out_per_rank, in_per_rank)
            self.register_parameter("weight_scale", None)
        elif isinstance(self.weight_format, Int4Format):
            self.int4 = self.weight_format
            full_in = in_per_rank * (self.tp_size if self.splits_input else 1)
            self.full_groups = self.int4.groups(full_in)  # of a checkpoint row
            self.weight, self.weight_scale, zero = self.int4.new_parameters(
                out_per_rank, in_per_rank
            )
            for param in (self.weight_scale, zero):
                if param is not None:
                    mark_filled_with_weight(param)
                    set_weight_loader(param, self.scale_loader)
            self.register_parameter("weight_zero_point", zero)
        else:
            self.weight, self.weight_scale = self.weight_format.new_parameters(
                out_per_rank, in_per_rank
            )
            mark_filled_with_weight(self.weight_scale)
            set_weight_loader(self.weight_scale, self.scale_loader)
            self.quantized_linear = self.weight_format.kernel(self.ops)
        set_weight_loader(self.weight, self.weight_loader)
        if bias:
            self.bias = new_parameter(out_per_rank)
            set_weight_loader(self.bias, self.weight_loader)
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId | None = None
    ) -> None:
        raise NotImplementedError

    def scale_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId | None = None
    ) -> None:
        """A pre-quantized checkpoint's scales of the weight (or of one shard id's part):
        per output channel ([N] or [N, 1]) or one for the tensor; a column-parallel layer keeps
        its rows' scales, a row-parallel one all of them (scales span the whole row)."""
        raise NotImplementedError

    def _fill_scale_rows(self, loaded: torch.Tensor, full_rows: int, start: int, rows: int,
                         offset: int, param: nn.Parameter | None = None) -> None:
        # rows [start, start + rows) of a `full_rows`-row checkpoint tensor's scales, at `offset`
        if self.int4 is not None:
            assert param is not None
            self._fill_group_rows(param, loaded, full_rows, start, rows, offset)
            return
        assert self.weight_scale is not None
        flat = loaded.float().reshape(-1)
        dst = self.weight_scale.data.narrow(0, offset, rows)
        if flat.numel() == 1:
            dst.fill_(flat[0])
        elif flat.numel() == full_rows:
            dst.copy_(flat.narrow(0, start, rows))
        else:
            raise ValueError(f"expected 1 or {full_rows} scales, got {tuple(loaded.shape)}")

    def _group_columns(self, groups: torch.Tensor, col: int) -> torch.Tensor:
        """This rank's groups of per-group values [r, full_groups] of whole checkpoint rows,
        the rank's inputs starting at input `col` of the row."""
        assert self.int4 is not None and self.weight_scale is not None
        if groups.dim() != 2 or groups.shape[1] != self.full_groups:
            raise ValueError(f"expected [rows, {self.full_groups}] per-group values, got "
                             f"{tuple(groups.shape)}")
        first = col // self.int4.group_size if self.int4.group_size else 0
        return groups.narrow(1, first, self.weight_scale.shape[1])

    def _fill_group_rows(self, param: nn.Parameter, loaded: torch.Tensor, full_rows: int,
                         start: int, rows: int, offset: int) -> None:
        # 4-bit scales / zero points [full_rows, full_groups]: rows [start, start + rows) and
        # this rank's groups, at row `offset`
        if loaded.dim() != 2 or loaded.shape[0] != full_rows:
            raise ValueError(f"expected [{full_rows}, {self.full_groups}] per-group values, got "
                             f"{tuple(loaded.shape)}")
        col = self.tp_rank * self.in_per_rank if self.splits_input else 0
        src = self._group_columns(loaded.narrow(0, start, rows), col)
        copy_checked(param.data.narrow(0, offset, rows), src.to(param.dtype))

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W.T + bias through the kernel of the weight's format."""
        if self.weight_scale is None:
            return self.ops.linear(x, self.weight, bias)
        if self.int4 is not None:
            return self.ops.linear_w4a16(x, self.weight, self.weight_scale,
                                         self.weight_zero_point, bias)
        return self.quantized_linear(x, self.weight, self.weight_scale, bias)

    def _store_int4(self, loaded: torch.Tensor, row: int, col: int) -> None:
        # full checkpoint rows: 4-bit values (uint8 0..15, a pre-quantized checkpoint's, its
        # scales coming through scale_loader) or full precision, quantized by whole rows
        assert self.int4 is not None and self.weight_scale is not None
        rows, cols = loaded.shape[0], self.in_per_rank
        if loaded.dtype == torch.uint8:
            q = loaded.narrow(1, col, cols)
        elif loaded.element_size() == 1:
            raise ValueError(f"the checkpoint's weight is {loaded.dtype}, this layer holds "
                             "4-bit weights")
        else:
            q_full, scale, zero = self.int4.quantize(loaded)
            q = q_full.narrow(1, col, cols)
            copy_checked(self.weight_scale.data.narrow(0, row, rows),
                         self._group_columns(scale, col))
            if self.weight_zero_point is not None:
                assert zero is not None
                copy_checked(self.weight_zero_point.data.narrow(0, row, rows),
                             self._group_columns(zero, col))
        copy_checked(self.weight.data.narrow(0, row, rows), pack_int4(q))

    def store_weight(self, loaded: torch.Tensor, row: int, col: int) -> None:
        """Fill this rank's weight rows [row, row + len(loaded)) from full checkpoint rows
        `loaded` [r, in_per_rank * s] of which this rank keeps columns [col, col + in_per_rank)
        (s = tp_size for a row-parallel layer, else 1). A quantized format scales each row by
        its whole width, before the columns are split."""
        if isinstance(self.weight_format, Int4Format):
            self._store_int4(loaded, row, col)
            return
        rows, cols = loaded.shape[0], self.weight.shape[1]
        if self.weight_format is None or self.weight_scale is None or loaded.element_size() == 1:
            # full precision, or already quantized (a pre-quantized checkpoint: the scales come
            # through scale_loader)
            if loaded.dtype != self.weight.dtype and loaded.element_size() == 1:
                raise ValueError(f"the checkpoint's weight is {loaded.dtype}, this layer holds "
                                 f"{self.weight.dtype}")
            copy_checked(self.weight.data.narrow(0, row, rows), loaded.narrow(1, col, cols))
            return
        q, scale = self.weight_format.quantize(loaded)
        copy_checked(self.weight.data.narrow(0, row, rows), q.narrow(1, col, cols))
        copy_checked(self.weight_scale.data.narrow(0, row, rows), scale)

    def fill_dummy(self, low: float, high: float, generator: torch.Generator) -> None:
        """Random weights (uniform in [low, high) of the model dtype) stored in the layer's
        format, for load_format=dummy."""
        dense = torch.empty(self.weight.shape[0], self.in_per_rank, dtype=self.params_dtype,
                            device=self.weight.device)
        dense.uniform_(low, high, generator=generator)
        if self.int4 is not None:  # this rank's rows and groups, quantized as they are
            assert self.weight_scale is not None
            q, scale, zero = self.int4.quantize(dense)
            self.weight.data.copy_(pack_int4(q))
            self.weight_scale.data.copy_(scale)
            if self.weight_zero_point is not None and zero is not None:
                self.weight_zero_point.data.copy_(zero)
            return
        self.store_weight(dense, 0, 0)


@dataclass(frozen=True)
class _Part:
    """One checkpoint tensor stacked into a fused column-parallel output."""

    full_rows: int  # rows of the whole checkpoint tensor
    rows: int  # rows this rank holds
    offset: int  # where they start in this rank's parameter
    index: int  # which slice of the checkpoint tensor this rank takes


class FusedColumnParallelLinear(LinearBase):
    """Several column-parallel outputs stacked along the output dimension."""

    def __init__(
        self, input_size: int, parts: dict[ShardId, tuple[int, int, int]], bias: bool,
        quantization: str | None = None,
    ) -> None:
        # parts: shard id -> (full_rows, rows per rank, slice index), in fused order
        self.parts: dict[ShardId, _Part] = {}
        offset = 0
        for shard_id, (full_rows, rows, index) in parts.items():
            self.parts[shard_id] = _Part(full_rows, rows, offset, index)
            offset += rows
        super().__init__(input_size, offset, bias, quantization)
        for param in (self.weight, self.bias, self.weight_scale, self.weight_zero_point):
            if param is not None:
                set_shard_ids(param, tuple(self.parts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId | None = None
    ) -> None:
        if shard_id is None:  # the fused checkpoint tensor: split into parts, then shard each
            sizes = [p.full_rows for p in self.parts.values()]
            if loaded.shape[0] != sum(sizes):
                raise ValueError(
                    f"fused tensor has {loaded.shape[0]} rows, expected {sum(sizes)} "
                    f"(parts {dict(zip(self.parts, sizes, strict=True))})"
                )
            for sid, piece in zip(self.parts, loaded.split(sizes, dim=0), strict=True):
                self.weight_loader(param, piece, sid)
            return
        part = self.parts.get(shard_id)
        if part is None:
            raise ValueError(f"unknown shard id {shard_id!r} (have {list(self.parts)})")
        if loaded.shape[0] != part.full_rows:
            raise ValueError(
                f"shard {shard_id!r} has {loaded.shape[0]} rows, expected {part.full_rows}"
            )
        src = loaded.narrow(0, part.index * part.rows, part.rows)
        if param is self.weight:
            if src.dim() != 2 or src.shape[1] != self.in_per_rank:
                raise ValueError(f"expected {self.in_per_rank} columns, got {tuple(src.shape)}")
            self.store_weight(src, part.offset, 0)
        else:
            copy_checked(param.data.narrow(0, part.offset, part.rows), src)


    def scale_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId | None = None
    ) -> None:
        if shard_id is None and self.int4 is not None:  # per-group values of the fused rows
            sizes = [p.full_rows for p in self.parts.values()]
            if loaded.dim() != 2 or loaded.shape[0] != sum(sizes):
                raise ValueError(f"expected {sum(sizes)} rows of per-group values, got "
                                 f"{tuple(loaded.shape)}")
            for sid, piece in zip(self.parts, loaded.split(sizes), strict=True):
                self.scale_loader(param, piece, sid)
            return
        if shard_id is None:  # scales of the fused tensor: one, or one per fused row
            sizes = [p.full_rows for p in self.parts.values()]
            if loaded.numel() not in (1, sum(sizes)):
                raise ValueError(f"expected 1 or {sum(sizes)} scales, got {tuple(loaded.shape)}")
            flat = loaded.float().reshape(-1)
            pieces = [flat] * len(sizes) if flat.numel() == 1 else flat.split(sizes)
            for sid, piece in zip(self.parts, pieces, strict=True):
                self.scale_loader(param, piece, sid)
            return
        part = self.parts.get(shard_id)
        if part is None:
            raise ValueError(f"unknown shard id {shard_id!r} (have {list(self.parts)})")
        self._fill_scale_rows(loaded, part.full_rows, part.index * part.rows, part.rows,
                              part.offset, param)


class MergedColumnParallelLinear(FusedColumnParallelLinear):
    """Outputs of equal-input projections stacked, e.g. gate|up (shard ids 0, 1, ...)."""

    def __init__(
        self, input_size: int, output_sizes: list[int], bias: bool = False,
        quantization: str | None = None,
    ) -> None:
        tp_size, rank = distributed.get_tp_size(), distributed.get_tp_rank()
        parts: dict[ShardId, tuple[int, int, int]] = {
            i: (size, _divide(size, tp_size, f"output size {i}"), rank)
            for i, size in enumerate(output_sizes)
        }
        super().__init__(input_size, parts, bias, quantization)
        self.output_sizes = list(output_sizes)


class QKVParallelLinear(FusedColumnParallelLinear):
    """q|k|v projections (shard ids "q", "k", "v"), split by heads across ranks.

    With fewer KV heads than ranks each KV head is replicated on tp_size // num_kv_heads ranks.
    """

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        total_num_heads: int,
        total_num_kv_heads: int,
        bias: bool = False,
        quantization: str | None = None,
    ) -> None:
        tp_size, rank = distributed.get_tp_size(), distributed.get_tp_rank()
        self.head_dim = head_dim
        self.num_heads = _divide(total_num_heads, tp_size, "attention heads")
        if tp_size >= total_num_kv_heads:
            replicas = _divide(tp_size, total_num_kv_heads, "tensor-parallel size vs kv heads")
            self.num_kv_heads, kv_index = 1, rank // replicas
        else:
            self.num_kv_heads = _divide(total_num_kv_heads, tp_size, "kv heads")
            kv_index = rank
        q_rows, kv_rows = self.num_heads * head_dim, self.num_kv_heads * head_dim
        parts: dict[ShardId, tuple[int, int, int]] = {
            "q": (total_num_heads * head_dim, q_rows, rank),
            "k": (total_num_kv_heads * head_dim, kv_rows, kv_index),
            "v": (total_num_kv_heads * head_dim, kv_rows, kv_index),
        }
        super().__init__(hidden_size, parts, bias, quantization)
        self.q_size, self.kv_size = q_rows, kv_rows


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs are summed with an all-reduce.

    The bias is replicated and added once, after the reduction. With `reduce_results=False` the
    layer returns a `PendingReduce` of this rank's partial sum, for the next norm to reduce; the
    partial is written into the group's symmetric buffer when it has one that fits, where the
    one-shot all-reduce + add + RMSNorm kernel reads it."""

    splits_input = True

    def __init__(
        self, input_size: int, output_size: int, bias: bool = False, reduce_results: bool = True,
        quantization: str | None = None,
    ) -> None:
        in_per_rank = _divide(input_size, distributed.get_tp_size(), "input size")
        super().__init__(in_per_rank, output_size, bias, quantization)
        if bias and not reduce_results:
            raise ValueError("a row-parallel linear with a bias must reduce its own results")
        self.reduce_results = reduce_results

    def weight_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId | None = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"unsharded parameter got shard id {shard_id!r}")
        if param is not self.weight:  # bias: replicated
            copy_checked(param.data, loaded)
            return
        cols = self.in_per_rank
        if loaded.dim() != 2 or loaded.shape[1] != cols * self.tp_size:
            raise ValueError(f"expected {cols * self.tp_size} columns, got {tuple(loaded.shape)}")
        if loaded.shape[0] != param.shape[0]:
            raise ValueError(f"expected {param.shape[0]} rows, got {tuple(loaded.shape)}")
        self.store_weight(loaded, 0, self.tp_rank * cols)

    def scale_loader(
        self, param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId | None = None
    ) -> None:
        if shard_id is not None:
            raise ValueError(f"unsharded parameter got shard id {shard_id!r}")
        rows = param.shape[0]
        self._fill_scale_rows(loaded, rows, 0, rows, 0, param)

    def forward(self, x: torch.Tensor) -> torch.Tensor | PendingReduce:
        if not self.reduce_results:
            return self._partial(x)
        if self.tp_size == 1:
            return self.matmul(x, self.bias)
        y = distributed.all_reduce(self.matmul(x, None))
        return y if self.bias is None else y + self.bias

    def _partial(self, x: torch.Tensor) -> PendingReduce:
        target = None
        if x.dim() == 2:
            target = distributed.symmetric_partial(x.shape[0], self.weight.shape[0], x.dtype)
        if target is None:
            return PendingReduce(self.matmul(x, None))
        if self.weight_scale is None:
            torch.mm(x, self.weight.t(), out=target.partial)
        else:  # the quantized kernels have no out=: one [T, hidden] copy
            target.partial.copy_(self.matmul(x, None))
        return PendingReduce(target.partial, target)
