"""The engine core: scheduler + block manager + model runner, at the level of token ids.

`EngineCore.step()` schedules one batch, runs it, appends the sampled tokens and applies the
token-level stop rules (EOS, stop token ids, max_tokens, max_model_len). It knows nothing of text:
tokenization, detokenization and stop strings happen outside it (in the output processor), so
the loop that drives the GPU never waits on them. It runs in the caller's process (offline `LLM`)
or in a process of its own behind the server (see core_process.py); the messages in and out are
in messages.py.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time

import torch

from flatout.config import EngineArgs
from flatout.engine.batch import (
    BlockTableSync,
    ImageSlice,
    SamplingInfo,
    ScheduledSeq,
    SchedulerOutput,
)
from flatout.engine.block_manager import BlockManager
from flatout.engine.messages import (
    EngineCoreOutput,
    EngineCoreRequest,
    EngineStats,
    FinishReason,
    TokenLogprobs,
)
from flatout.engine.request import Sequence
from flatout.engine.scheduler import Schedule, Scheduler
from flatout.models.glm4v import mrope_positions
from flatout.models.registry import resolve_model
from flatout.worker.model_runner import LaunchedStep, ModelRunner
from flatout.worker.parallel import TensorParallelGroup, resolve_device

log = logging.getLogger(__name__)


def scheduler_output(
    sched: Schedule, block_tables: BlockTableSync, freed_encoder_hashes: list[bytes] | None = None
) -> SchedulerOutput:
    """The runner's view of a step: each sequence's inputs, block-table delta and sampling, and
    the images to encode."""
    rows = []
    for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
        start = seq.num_computed_tokens
        known = seq.token_ids[start : start + n]
        pending_row = seq.pending.row if len(known) < n else None
        is_new, blocks = block_tables.delta(seq.seq_id, seq.block_table)
        sample = start + n == seq.num_tokens + seq.num_pending_tokens
        row = ScheduledSeq(seq.seq_id, start, known, pending_row, is_new, blocks, sample,
                           sampling_info(seq) if sample else None)
        if seq.mm_items:
            _add_images(row, seq, start, start + n)
        rows.append(row)
    return SchedulerOutput(rows, block_tables.take_finished(), list(sched.encoder_inputs),
                           freed_encoder_hashes or [])


def _add_images(row: ScheduledSeq, seq: Sequence, start: int, end: int) -> None:
    """A row of a request with images: its M-RoPE positions and the image rows it reads."""
    row.rope_delta = seq.rope_delta
    if seq.mrope_positions is not None and start < seq.num_prompt_tokens:
        t, h, w = seq.mrope_positions
        # tokens past the prompt (recomputed outputs) continue at position + rope delta
        tail = list(range(seq.num_prompt_tokens + seq.rope_delta, end + seq.rope_delta))
        row.mrope_positions = (t[start:end] + tail, h[start:end] + tail, w[start:end] + tail)
    for item in seq.mm_items:
        lo, hi = max(start, item.offset), min(end, item.end)
        if lo < hi:
            row.image_slices.append(
                ImageSlice(item.content_hash, lo - item.offset, hi - item.offset, lo - start))


# -- the token-level stop rules ---------------------------------------------------------------
def sampling_info(seq: Sequence) -> SamplingInfo:
    """How to sample the sequence's next token; under min_tokens its stop ids are banned (the
    ban `check_stop` relies on: it lets a stop id end the output only from min_tokens on)."""
    p = seq.params
    banned: list[int] = []
    if seq.num_generated_tokens < p.min_tokens:  # counts the pending token
        banned = list(p.stop_token_ids or [])
        if not p.ignore_eos:
            banned += seq.eos_token_ids
    return SamplingInfo(
        params=p,
        prompt_token_ids=seq.prompt_token_ids,
        output_token_ids=seq.output_token_ids,
        banned_token_ids=banned,
        seed=None if p.seed is None else p.seed + seq.index,
    )


def check_stop(seq: Sequence, token: int, max_model_len: int) -> FinishReason | None:
    """The reason `token`, just appended to `seq`, ends it (None: it goes on)."""
    p = seq.params
    if seq.num_output_tokens >= p.min_tokens:
        if token in p.stop_token_ids:  # type: ignore[operator]
            seq.stop_reason = token
            return FinishReason.STOP
        if not p.ignore_eos and token in seq.eos_token_ids:
            return FinishReason.STOP
    if seq.num_output_tokens >= seq.max_tokens:
        return FinishReason.LENGTH
    if seq.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None


class EngineCore:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        torch.manual_seed(args.seed)
        self.model_config = resolve_model(args, self.device.type)
        config = args.resolve(self.model_config)  # every component's, before anything loads
        if self.device.type == "cuda":  # refuse what cannot fit before loading anything
            from flatout.plan import check_fits

            total = torch.cuda.mem_get_info(self.device)[1]
            check_fits(self.model_config, args, total, torch.cuda.get_device_name(self.device))
        start = time.monotonic()
        # tensor parallel: this process is rank 0; the group starts the other ranks first, and
        # the layers read their rank when the runner builds the model
        self.tp_group: TensorParallelGroup | None = None
        if config.parallel.tensor_parallel_size > 1:
            self.tp_group = TensorParallelGroup(config, self.device)
            self.device = self.tp_group.device
        try:
            self.runner = ModelRunner(config, self.device)
        except BaseException:
            if self.tp_group is not None:
                self.tp_group.shutdown()
            raise
        if self.tp_group is not None:
            self.tp_group.stop_workers = self.runner.shutdown
        self.load_seconds = time.monotonic() - start
        # the cache as planned by the runner
        self.cache_config = dataclasses.replace(config.cache, num_blocks=self.runner.num_blocks)
        self.scheduler_config = config.scheduler
        self.block_manager = BlockManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.scheduler_config, self.block_manager)
        self.block_tables = BlockTableSync()  # what the runner holds of each block table
        self.seqs: dict[str, list[Sequence]] = {}  # request id -> its sequences
        self.stats = EngineStats()
        self._seq_ids = itertools.count()
        # launched, its tokens not read back yet, and the sequences of its sampled rows
        self._in_flight: tuple[LaunchedStep, list[Sequence]] | None = None

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks, if any (idempotent; also runs at exit)."""
        if self.tp_group is not None:
            self.tp_group.shutdown()

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        if req.request_id in self.seqs:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        seqs = [
            Sequence(
                seq_id=next(self._seq_ids),
                request_id=req.request_id,
                index=i,
                prompt_token_ids=req.prompt_token_ids,
                params=req.params,
                max_tokens=req.max_tokens,
                arrival_time=req.arrival_time,
                eos_token_ids=req.eos_token_ids,
            )
            for i in range(req.params.n)
        ]
        if req.mm_items:
            self._place_images(req, seqs)
        self.seqs[req.request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)

    def _place_images(self, req: EngineCoreRequest, seqs: list[Sequence]) -> None:
        """Give a request's sequences its images and M-RoPE positions (ValueError if the
        model takes no images or the placeholders do not match the images)."""
        vision = self.model_config.vision
        if vision is None:
            raise ValueError(f"{self.model_config.architecture} takes no images")
        ids = req.prompt_token_ids
        for i, item in enumerate(req.mm_items):
            if ids[item.offset : item.end] != [vision.image_token_id] * item.num_tokens:
                raise ValueError(f"mm_items[{i}]: prompt tokens [{item.offset}, {item.end}) "
                                 f"are not its {item.num_tokens} image placeholders")
        grids = [item.grid_thw for item in req.mm_items]
        positions, delta = mrope_positions(ids, grids, vision.image_token_id,
                                           vision.spatial_merge_size)
        t, h, w = positions.tolist()
        for seq in seqs:
            seq.mm_items = req.mm_items
            seq.mrope_positions = (t, h, w)
            seq.rope_delta = delta

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (or one of its n sequences) and free its blocks; unknown ids are
        ignored (the request may have finished meanwhile)."""
        seqs = self.seqs.get(request_id)
        if seqs is None:
            return
        for seq in seqs:
            if (index is None or seq.index == index) and not seq.is_finished:
                self._finish(seq, FinishReason.ABORT)
        self._forget_if_done(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """Launch the next batch, then collect the one launched before it.

        The device runs one step behind the host: while it computes step N+1, this process reads
        step N's tokens, applies the stop rules and (next call) schedules step N+2. A sequence
        that stops at step N has also run in step N+1; that token is dropped. The outputs
        returned are those of the step before the one launched."""
        sched = self.scheduler.schedule()
        for seq in sched.preempted:
            self.block_tables.reset(seq.seq_id)
        launched = None
        if not sched.is_empty:
            batch = scheduler_output(sched, self.block_tables,
                                     self.scheduler.encoder_cache.take_freed())
            step = self.runner.launch(batch)
            self.scheduler.update_computed(sched)
            self._count(sched)
            if step is not None:
                sampled = [seq for seq, row in zip(sched.seqs, batch.seqs, strict=True)
                           if row.sample]
                for i, seq in enumerate(sampled):
                    seq.pending.launched(i)
                launched = step, sampled
        previous, self._in_flight = self._in_flight, launched
        if previous is None:
            return []
        return self._collect(*previous)

    def _count(self, sched: Schedule) -> None:
        st = self.stats
        st.num_steps += 1
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            if n == 1 and seq.num_generated_tokens > 0:
                st.num_decode_tokens += 1
            else:
                st.num_prefill_tokens += n

    def _collect(self, launched: LaunchedStep, seqs: list[Sequence]) -> list[EngineCoreOutput]:
        outputs = []
        st = self.stats
        now = time.monotonic()
        for seq, tok in zip(seqs, self.runner.collect(launched), strict=True):
            seq.pending.collected()
            if seq.is_finished:  # stopped (or aborted) while this step ran: drop its token
                continue
            seq.token_ids.append(tok.token_id)
            self.block_manager.commit(seq)  # a block its pending token filled is hashable now
            st.num_generated_tokens += 1
            if seq.first_token_time is None:
                seq.first_token_time = now
            out = EngineCoreOutput(
                seq.request_id, seq.index, [tok.token_id], num_cached_tokens=seq.num_cached_tokens
            )
            if seq.num_output_tokens == 1 and seq.first_scheduled_time is not None:
                out.queue_time = seq.first_scheduled_time - seq.arrival_time
            if tok.logprob is not None:
                out.new_logprobs = [TokenLogprobs(tok.token_id, tok.logprob, tok.top or {})]
            reason = check_stop(seq, tok.token_id, self.model_config.max_model_len)
            if reason is not None:
                self._finish(seq, reason)
                out.finish_reason, out.stop_reason = reason, seq.stop_reason
            outputs.append(out)
        for rid in {o.request_id for o in outputs if o.finish_reason is not None}:
            self._forget_if_done(rid)
        return outputs

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq, reason)
        self.block_tables.finish(seq.seq_id)

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self.seqs.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self.seqs[request_id]
