"""The flattening of a scheduled step into the forward's input tensors, in one place.

Every rank keeps the block tables of the sequences it runs (`BlockTables`, updated from each
step's deltas) and turns the step's rows into one flat batch (`InputBatch`): prefill chunks and
decodes side by side, row i's tokens at [query_start_loc[i], query_start_loc[i + 1]).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch

from flatout.engine.batch import ImageSlice, SchedulerOutput


class BlockTables:
    """A rank's copy of the block table of every sequence it has run and not seen finish."""

    def __init__(self) -> None:
        self.tables: dict[int, list[int]] = {}

    def apply(self, batch: SchedulerOutput) -> list[list[int]]:
        """Apply the step's deltas; return the block table of each row."""
        for sid in batch.finished_seq_ids:
            self.tables.pop(sid, None)
        tables = []
        for s in batch.seqs:
            if s.is_new:
                table = self.tables[s.seq_id] = list(s.new_block_ids)
            else:
                table = self.tables[s.seq_id]
                table.extend(s.new_block_ids)
            tables.append(table)
        return tables


@dataclass
class InputBatch:
    """One step's inputs on the host, flat (int lists)."""

    input_ids: list[int]  # a pending row's last id is 0, replaced on the device
    positions: list[int]
    slot_mapping: list[int]  # KV-cache slot of each token: block id * block size + offset
    logits_rows: list[int]  # flat index of each sampled row's last token
    pending_at: list[int]  # flat indices whose token is the previous step's sampled one ...
    pending_rows: list[int]  # ... at this row of its sampled tokens
    query_start_loc: list[int]  # [num rows + 1]
    seq_lens: list[int]  # context length of each row after this step
    block_tables: list[int]  # [num rows * max_blocks], each table padded with block 0
    max_blocks: int
    # prefix-LM rows: their bidirectional context length (0 for causal rows)
    prefix_lens: list[int] = field(default_factory=list)
    # 2: positions hold (position, block position) pairs per token (ChatGLM-6B v1)
    position_dims: int = 1
    # M-RoPE: (t, h, w) rows over the flat tokens, when any row has image positions (the
    # others' tokens sit at `positions` on all three axes); None: `positions` is all
    mrope_positions: tuple[list[int], list[int], list[int]] | None = None
    image_index: list[int] | None = None  # flat indices of the image tokens, in order ...
    image_slices: list[ImageSlice] | None = None  # ... and the encoder rows they take

    @classmethod
    def build(cls, batch: SchedulerOutput, tables: list[list[int]], block_size: int,
              position_dims: int = 1) -> InputBatch:
        """Flatten `batch`'s rows; `tables` is each row's block table (BlockTables.apply).
        position_dims 2: each token's 2-D position from its row's PrefixLayout."""
        bs = block_size
        flat = cls([], [], [], [], [], [], [0], [], [], max(len(t) for t in tables),
                   position_dims=position_dims)
        for s, table in zip(batch.seqs, tables, strict=True):
            start, end = s.start, s.end
            flat.input_ids.extend(s.token_ids)
            if s.pending_row is not None:
                flat.pending_at.append(len(flat.input_ids))
                flat.pending_rows.append(s.pending_row)
                flat.input_ids.append(0)
            if position_dims == 2:
                if s.prefix is None:
                    raise ValueError(f"sequence {s.seq_id}: 2-D positions need its PrefixLayout")
                flat.positions.extend(s.prefix.positions(start, end))
            elif s.positions is not None:
                flat.positions.extend(s.positions)
            else:
                flat.positions.extend(range(start + s.rope_delta, end + s.rope_delta))
            flat.prefix_lens.append(s.prefix.context_len if s.prefix is not None else 0)
            flat.slot_mapping.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            flat.query_start_loc.append(flat.query_start_loc[-1] + s.num_tokens)
            flat.seq_lens.append(end)
            flat.block_tables.extend(table)
            flat.block_tables.extend([0] * (flat.max_blocks - len(table)))
            if s.sample:
                flat.logits_rows.append(flat.query_start_loc[-1] - 1)
        if any(s.image_slices or s.mrope_positions for s in batch.seqs):
            flat._add_images(batch)
        return flat

    def _add_images(self, batch: SchedulerOutput) -> None:
        """The flat indices of the image tokens and the encoder rows they take; the M-RoPE
        (t, h, w) rows when any row has them (GLM-4.1V; GLM-4V-9B's positions are 1-D)."""
        self.image_index, self.image_slices = [], []
        for s, base in zip(batch.seqs, self.query_start_loc, strict=False):
            for sl in s.image_slices:
                self.image_index.extend(range(base + sl.at, base + sl.at + sl.last - sl.first))
                self.image_slices.append(sl)
        if not any(s.mrope_positions for s in batch.seqs):
            return
        t: list[int] = []
        h: list[int] = []
        w: list[int] = []
        for s, base in zip(batch.seqs, self.query_start_loc, strict=False):
            if s.mrope_positions is not None:
                for axis, rows in zip((t, h, w), s.mrope_positions, strict=True):
                    axis.extend(rows)
            else:
                for axis in (t, h, w):
                    axis.extend(self.positions[base : base + s.num_tokens])
        self.mrope_positions = (t, h, w)

    @property
    def num_rows(self) -> int:
        return len(self.seq_lens)

    @property
    def max_query_len(self) -> int:
        q = self.query_start_loc
        return max(b - a for a, b in zip(q, q[1:], strict=False))

    def to_device(self, device: torch.device) -> DeviceInputs:
        """Every index tensor of the step in one host-to-device copy."""
        mrope = self.mrope_positions
        positions = self.positions if mrope is None else mrope[0] + mrope[1] + mrope[2]
        image_index = self.image_index or []
        has_prefix = any(self.prefix_lens)
        ids, pos, slots, rows, pend_at, pend_rows, qsl, lens, tables, image, prefix = upload(
            device, self.input_ids, positions, self.slot_mapping, self.logits_rows,
            self.pending_at, self.pending_rows, self.query_start_loc, self.seq_lens,
            self.block_tables, image_index, self.prefix_lens if has_prefix else [],
        )
        if mrope is not None:
            pos = pos.view(3, -1)  # [3, T]: t, h, w
        elif self.position_dims > 1:
            pos = pos.view(-1, self.position_dims)
        return DeviceInputs(ids, pos, slots, rows, pend_at, pend_rows, qsl, lens,
                            tables.view(self.num_rows, self.max_blocks), image,
                            prefix if has_prefix else None)


@dataclass
class DeviceInputs:
    """`InputBatch` as int64 tensors on the device."""

    input_ids: torch.Tensor
    positions: torch.Tensor  # [T]; [T, 2] for 2-D positions; [3, T] with M-RoPE images
    slot_mapping: torch.Tensor
    logits_rows: torch.Tensor
    pending_at: torch.Tensor
    pending_rows: torch.Tensor
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor  # [num rows, max_blocks]
    image_index: torch.Tensor  # flat indices of the image tokens (empty without images)
    prefix_lens: torch.Tensor | None = None  # [num rows]; None: no row has a prefix


def upload(device: torch.device, *lists: list[int]) -> list[torch.Tensor]:
    """int64 device tensors of `lists`, through one pinned buffer and one asynchronous copy
    (a copy from pageable memory would make the host wait for the device's queue)."""
    sizes = [len(x) for x in lists]
    flat = np.fromiter(itertools.chain.from_iterable(lists), np.int64, sum(sizes))
    if device.type == "cuda":
        host = torch.empty(len(flat), dtype=torch.int64, pin_memory=True)
        host.numpy()[:] = flat
        dev = host.to(device, non_blocking=True)
    else:
        dev = torch.from_numpy(flat)
    return list(dev.split(sizes))
