"""The scheduler's image handling (no torch): encoder budget per step, chunks cut before an image
that cannot be encoded this step, one encode per content hash, the encoder cache bounded and
emptied as sequences compute past their images, finish or are preempted."""

from __future__ import annotations

import pytest

from flatout.config import SchedulerConfig
from flatout.engine.batch import MultiModalItem
from flatout.engine.block_manager import BlockManager
from flatout.engine.encoder_cache import EncoderCache
from flatout.engine.request import FinishReason, Sequence
from flatout.engine.scheduler import Scheduler
from flatout.sampling_params import SamplingParams

_ids = iter(range(10**9))
IMG = 99


def item(offset: int, n: int, key: bytes) -> MultiModalItem:
    return MultiModalItem(offset, n, (1, 2, 2 * n), (28, 28 * n), key, None)


def seq_with(prefix: int, images: list[tuple[int, bytes]], suffix: int = 2) -> Sequence:
    """`prefix` text tokens, then each image (n placeholders) followed by one text token."""
    ids, items = list(range(1, prefix + 1)), []
    for n, key in images:
        items.append(item(len(ids), n, key))
        ids += [IMG] * n + [7]
    ids += [8] * suffix
    seq = Sequence(seq_id=next(_ids), request_id="r", index=0, prompt_token_ids=ids,
                   params=SamplingParams(max_tokens=4), max_tokens=4, arrival_time=0.0)
    seq.mm_items = items
    return seq


def make(budget: int, encoder_budget: int | None = None, cache: int | None = None) -> Scheduler:
    bm = BlockManager(64, 4, enable_prefix_caching=True)
    return Scheduler(SchedulerConfig(8, budget, 10_000), bm, encoder_budget, cache)


def step(s: Scheduler) -> tuple[list[int], list[bytes]]:
    """Schedule and 'compute'; a sequence whose tokens are all computed gets a new one."""
    out = s.schedule()
    s.update_computed(out)
    for seq in out.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(1)
    return out.num_new_tokens, [m.content_hash for m in out.encoder_inputs]


def test_chunk_split_across_an_image_encodes_it_once() -> None:
    s = make(budget=6)
    seq = seq_with(3, [(8, b"a")])  # 3 text, 8 image, 1 text, 2 text
    s.add(seq)
    assert step(s) == ([6], [b"a"])  # reaches into the image: encoded now
    assert s.encoder_cache.users == {b"a": {seq.seq_id}}
    assert step(s) == ([6], [])  # the rest of the image from the cache
    assert b"a" not in s.encoder_cache and s.encoder_cache.take_freed() == [b"a"]
    s.encoder_cache.check_integrity()


def test_encoder_budget_cuts_the_chunk_before_the_image() -> None:
    s = make(budget=64, encoder_budget=10)
    first, second = seq_with(2, [(8, b"a")]), seq_with(5, [(8, b"b")])
    s.add(first)
    s.add(second)
    # the budget holds one image: the second request computes its text up to its image
    assert step(s) == ([13, 5], [b"a"])
    assert step(s) == ([1, 11], [b"b"])  # first samples; second encodes b now


def test_first_image_of_a_step_may_exceed_the_budget() -> None:
    s = make(budget=64, encoder_budget=4, cache=4)
    s.add(seq_with(1, [(8, b"big")]))
    assert step(s) == ([12], [b"big"])


def test_same_image_in_two_requests_is_encoded_once_and_shared() -> None:
    s = make(budget=64)
    a, b = seq_with(2, [(8, b"x")]), seq_with(3, [(8, b"x")])
    s.add(a)
    s.add(b)
    assert step(s) == ([13, 14], [b"x"])
    assert s.encoder_cache.num_used == 0 and s.encoder_cache.take_freed() == [b"x"]


def test_cache_capacity_holds_an_image_back_until_space_is_freed() -> None:
    s = make(budget=6, encoder_budget=100, cache=8)
    a = seq_with(0, [(8, b"a")])
    s.add(a)
    assert step(s) == ([6], [b"a"])  # a holds 8 of the 8 cached embeddings
    b = seq_with(0, [(8, b"b")])
    s.add(b)
    assert step(s) == ([5], [])  # b may not encode yet: the cache is full (a's last tokens)
    assert step(s) == ([1, 5], [b"b"])  # a released its image: b goes


def test_finish_and_preemption_release_the_images() -> None:
    s = make(budget=6)
    seq = seq_with(3, [(8, b"a")])
    s.add(seq)
    step(s)
    s.finish(seq, FinishReason.ABORT)
    assert s.encoder_cache.num_used == 0 and s.encoder_cache.take_freed() == [b"a"]
    other = seq_with(3, [(8, b"c")])
    s.add(other)
    step(s)
    s._preempt(other)
    assert s.encoder_cache.num_used == 0
    assert step(s) == ([6], [b"c"])  # recomputed from the start: encoded again


def test_encoder_cache_bookkeeping() -> None:
    cache = EncoderCache(4)
    assert cache.can_add(100)  # empty: any one image
    cache.add(b"k", 3)
    assert not cache.can_add(2) and cache.can_add(1)
    with pytest.raises(RuntimeError, match="twice"):
        cache.add(b"k", 3)
    cache.use(b"k", 1)
    cache.use(b"k", 2)
    cache.release(b"k", 1)
    cache.release(b"k", 1)  # again: no-op
    assert b"k" in cache
    cache.release(b"k", 2)
    assert b"k" not in cache and cache.take_freed() == [b"k"] and cache.num_used == 0
    with pytest.raises(ValueError, match="capacity"):
        EncoderCache(0)
