"""A step with images, flattened: 3-D positions for every row once one row has them (text rows
at position + rope delta on all three axes), the image tokens' flat indices in order, and the
rows' image fields surviving the pickle to the other tensor-parallel ranks."""

from __future__ import annotations

import pickle

import torch

from flatout.engine.batch import ImageSlice, SamplingInfo, ScheduledSeq, SchedulerOutput
from flatout.sampling_params import SamplingParams
from flatout.worker.input_batch import InputBatch


def rows() -> list[ScheduledSeq]:
    text = ScheduledSeq(0, 5, [7], None, False, [], True, rope_delta=-3)  # a decode at 5 - 3
    image = ScheduledSeq(1, 2, [1, 9, 9, 9, 2], None, True, [0], False,
                         mrope_positions=([2, 3, 3, 3, 5], [2, 3, 3, 4, 5], [2, 3, 4, 3, 5]),
                         rope_delta=-1,
                         image_slices=[ImageSlice(b"h", 1, 4, 1)])
    return [text, image]


def test_flat_batch_with_an_image_row() -> None:
    flat = InputBatch.build(SchedulerOutput(rows()), [[3], [0]], block_size=8)
    assert flat.positions[0] == 2  # 5 + rope delta
    assert flat.mrope_positions == ([2, 2, 3, 3, 3, 5], [2, 2, 3, 3, 4, 5], [2, 2, 3, 4, 3, 5])
    assert flat.image_index == [2, 3, 4]  # after the text row's token and the <boi>
    assert flat.slot_mapping == [3 * 8 + 5, 2, 3, 4, 5, 6]  # the cache uses the real positions
    t = flat.to_device(torch.device("cpu"))
    assert t.positions.shape == (3, 6) and t.image_index.tolist() == [2, 3, 4]


def test_text_only_batch_keeps_1d_positions() -> None:
    flat = InputBatch.build(SchedulerOutput(rows()[:1]), [[3]], block_size=8)
    assert flat.mrope_positions is None
    assert flat.to_device(torch.device("cpu")).positions.tolist() == [2]


def test_image_fields_survive_the_pickle_sampling_does_not() -> None:
    row = rows()[1]
    row.sampling = SamplingInfo(SamplingParams(), [1], [])
    back = pickle.loads(pickle.dumps(row))
    assert back.sampling is None
    assert (back.mrope_positions, back.rope_delta, back.image_slices) == (
        row.mrope_positions, row.rope_delta, row.image_slices)


def test_collapsed_1d_positions_of_a_glm4v_9b_row() -> None:
    """GLM-4V-9B: the row's own 1-D positions (an image span shares three), no M-RoPE rows,
    the image tokens' flat indices still given; the positions survive the pickle."""
    text = rows()[0]
    image = ScheduledSeq(1, 2, [290, 0, 0, 291, 8], None, True, [0], False,
                         rope_delta=-2, image_slices=[ImageSlice(b"h", 0, 4, 0)],
                         positions=[2, 3, 3, 4, 5])
    flat = InputBatch.build(SchedulerOutput([text, image]), [[3], [0]], block_size=8)
    assert flat.mrope_positions is None
    assert flat.positions == [2, 2, 3, 3, 4, 5]
    assert flat.image_index == [1, 2, 3, 4]
    assert flat.slot_mapping == [3 * 8 + 5, 2, 3, 4, 5, 6]
    t = flat.to_device(torch.device("cpu"))
    assert t.positions.tolist() == [2, 2, 3, 3, 4, 5] and t.image_index.tolist() == [1, 2, 3, 4]
    assert pickle.loads(pickle.dumps(image)).positions == image.positions
