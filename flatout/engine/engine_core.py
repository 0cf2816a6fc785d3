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
import gc
import itertools
import logging
import time
import weakref
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures

import torch

from flatout.config import EngineArgs
from flatout.engine.batch import (
    BlockTableSync,
    ImageSlice,
    SamplingInfo,
    ScheduledSeq,
    SchedulerOutput,
    prompt_layout,
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
from flatout.engine.structured import (
    BitmaskFiller,
    GrammarCompiler,
    GrammarError,
    SequenceGrammar,
)
from flatout.models.glm4v import mrope_positions
from flatout.models.registry import TORCH_DTYPES, resolve_model
from flatout.multimodal.placement import collapsed_positions, image_span
from flatout.worker.kv_cache import kv_cache_dtype
from flatout.worker.model_runner import LaunchedStep, ModelRunner
from flatout.worker.parallel import TensorParallelGroup, ensure_no_live_group, resolve_device

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
                           sampling_info(seq) if sample else None, seq.prefix)
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
    if seq.prompt_positions is not None and start < seq.num_prompt_tokens:
        tail = list(range(seq.num_prompt_tokens + seq.rope_delta, end + seq.rope_delta))
        row.positions = seq.prompt_positions[start:end] + tail
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


def _release(tp_group: TensorParallelGroup | None, grammars: GrammarCompiler) -> None:
    """Stop what a core leaves running besides itself (so it holds no reference to the core)."""
    grammars.shutdown()
    if tp_group is not None:
        tp_group.shutdown()


class EngineCore:
    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        torch.manual_seed(args.seed)
        self.model_config = resolve_model(args, self.device.type)
        config = args.resolve(self.model_config)  # every component's, before anything loads
        # an fp8 KV cache on a GPU without fp8 conversions: refused before any rank starts
        kv_cache_dtype(config.cache, TORCH_DTYPES[self.model_config.dtype], self.device)
        if self.device.type == "cuda":  # refuse what cannot fit before loading anything
            from flatout.plan import check_fits

            total = torch.cuda.mem_get_info(self.device)[1]
            check_fits(self.model_config, args, total, torch.cuda.get_device_name(self.device))
        start = time.monotonic()
        # tensor parallel: this process is rank 0; the group starts the other ranks first, and
        # the layers read their rank when the runner builds the model
        self.tp_group: TensorParallelGroup | None = None
        ensure_no_live_group(config.parallel.tensor_parallel_size)
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
        self.closed = False
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
        # structured output: requests waiting for their grammar, each sequence's matcher, and
        # the requests whose grammar failed to compile (taken by the caller: take_rejected)
        self.grammars = GrammarCompiler(self.model_config.tokenizer, self.model_config.vocab_size)
        self._bitmasks = BitmaskFiller(self.model_config.vocab_size,
                                       pin=self.device.type == "cuda")
        self._compiling: dict[str, tuple[EngineCoreRequest, Future]] = {}
        self._seq_grammars: dict[int, SequenceGrammar] = {}
        self._rejected: list[tuple[str, GrammarError]] = []
        # the group and the compiler's threads stop with this core: at shutdown(), when the
        # core is garbage-collected (`del llm`) or at interpreter exit, whichever comes first
        self._finalizer = weakref.finalize(self, _release, self.tp_group, self.grammars)

    def shutdown(self) -> None:
        """Stop the other tensor-parallel ranks and leave their group, then release the model
        and the KV cache, so that another engine can start in this process (idempotent). The
        core takes no requests afterwards."""
        if self.closed:
            return
        self.closed = True
        self._finalizer()  # once
        self._in_flight = None
        del self.runner
        if self.device.type == "cuda":  # the next engine plans its KV cache from free memory
            gc.collect()
            torch.cuda.empty_cache()

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this engine has been shut down; create a new one")

    # -- requests ---------------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        """Queue a request; one with structured output waits (outside the scheduler) until its
        grammar is compiled, in the compiler's threads."""
        self._check_open()
        if req.request_id in self.seqs or req.request_id in self._compiling:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        # a bad prompt fails here, before any grammar compiles for it
        prompt_layout(self.model_config, req.prompt_token_ids)
        if req.mm_items:
            self._check_images(req)
        so = req.params.structured_outputs
        if so is None:
            self._schedule(req)
            return
        future = self.grammars.submit(so)
        if future.done():
            self._grammar_ready(req, future)
        else:
            self._compiling[req.request_id] = req, future

    def take_rejected(self) -> list[tuple[str, GrammarError]]:
        """Requests dropped since the last call because their grammar did not compile."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def _admit_compiled(self) -> None:
        """Queue the requests whose grammar finished compiling; if nothing else runs, wait a
        little for one (instead of spinning)."""
        if not self._compiling:
            return
        if not self.scheduler.has_unfinished():
            wait_futures([f for _, f in self._compiling.values()], timeout=0.01,
                         return_when="FIRST_COMPLETED")
        for rid, (req, future) in list(self._compiling.items()):
            if future.done():
                del self._compiling[rid]
                self._grammar_ready(req, future)

    def _grammar_ready(self, req: EngineCoreRequest, future: Future) -> None:
        so = req.params.structured_outputs
        assert so is not None
        try:
            compiled = future.result()
        except GrammarError as e:
            self._rejected.append((req.request_id, e))
            return
        except Exception as e:  # noqa: BLE001 - any failure of the compiler is the request's
            self._rejected.append((req.request_id, GrammarError(so.field, f"{type(e).__name__}: "
                                                                f"{e}")))
            return
        stop_ids = list(req.eos_token_ids) + list(req.params.stop_token_ids or [])
        for seq in self._schedule(req):
            self._seq_grammars[seq.seq_id] = SequenceGrammar.start(compiled, so, stop_ids)

    def _schedule(self, req: EngineCoreRequest) -> list[Sequence]:
        prefix = prompt_layout(self.model_config, req.prompt_token_ids)
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
                prefix=prefix,
            )
            for i in range(req.params.n)
        ]
        if req.mm_items:
            self._place_images(req, seqs)
        self.seqs[req.request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        return seqs

    def _check_images(self, req: EngineCoreRequest) -> None:
        """ValueError if the model takes no images or the prompt's spans do not match them."""
        span = image_span(self.model_config)
        if span is None:
            raise ValueError(f"{self.model_config.architecture} takes no images")
        ids, end = req.prompt_token_ids, 0
        for i, item in enumerate(req.mm_items):
            if item.offset < end or not span.matches(ids, item.offset, item.num_tokens):
                raise ValueError(f"mm_items[{i}]: prompt tokens [{item.offset}, {item.end}) "
                                 f"are not its {item.num_tokens} image tokens, after the "
                                 f"previous image's")
            end = item.end

    def _place_images(self, req: EngineCoreRequest, seqs: list[Sequence]) -> None:
        """Give a request's sequences its images and their positions (checked on admission):
        GLM-4.1V's M-RoPE rows, GLM-4V-9B's collapsed 1-D positions."""
        ids = req.prompt_token_ids
        vision = self.model_config.vision
        mrope: tuple[list[int], list[int], list[int]] | None = None
        prompt_positions: list[int] | None = None
        if vision is not None:
            grids = [item.grid_thw for item in req.mm_items]
            positions, delta = mrope_positions(ids, grids, vision.image_token_id,
                                               vision.spatial_merge_size)
            t, h, w = positions.tolist()
            mrope = (t, h, w)
        else:
            prompt_positions, delta = collapsed_positions(
                len(ids), [(item.offset, item.num_tokens) for item in req.mm_items])
        for seq in seqs:
            seq.mm_items = req.mm_items
            seq.mrope_positions = mrope
            seq.prompt_positions = prompt_positions
            seq.rope_delta = delta

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (or one of its n sequences) and free its blocks; unknown ids are
        ignored (the request may have finished meanwhile)."""
        if index is None and self._compiling.pop(request_id, None) is not None:
            return
        seqs = self.seqs.get(request_id)
        if seqs is None:
            return
        for seq in seqs:
            if (index is None or seq.index == index) and not seq.is_finished:
                self._finish(seq, FinishReason.ABORT)
        self._forget_if_done(request_id)

    def has_unfinished(self) -> bool:
        return bool(self.seqs or self._compiling)

    # -- the loop ---------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        """Launch the next batch, then collect the one launched before it.

        The device runs one step behind the host: while it computes step N+1, this process reads
        step N's tokens, applies the stop rules and (next call) schedules step N+2. A sequence
        that stops at step N has also run in step N+1; that token is dropped. The outputs
        returned are those of the step before the one launched.

        When a row of step N+1 follows a grammar, its allowed tokens depend on its token of step
        N: step N+1's forward is launched first, then step N is read back, the matchers advance
        and the bitmask is filled (while the forward runs), and only then is step N+1's sampling
        launched. Steps without grammar rows launch forward and sampling together."""
        self._check_open()
        self._admit_compiled()
        sched = self.scheduler.schedule()
        for seq in sched.preempted:
            self.block_tables.reset(seq.seq_id)
        previous, self._in_flight = self._in_flight, None
        outputs: list[EngineCoreOutput] = []
        if not sched.is_empty:
            batch = scheduler_output(sched, self.block_tables,
                                     self.scheduler.encoder_cache.take_freed())
            forward = self.runner.launch_forward(batch)
            self.scheduler.update_computed(sched)
            self._count(sched)
            if forward is not None:
                sampled = [seq for seq, row in zip(sched.seqs, batch.seqs, strict=True)
                           if row.sample]
                grammars = [self._seq_grammars.get(seq.seq_id) for seq in sampled]
                bitmask = None
                if any(g is not None for g in grammars):
                    # a grammar's next tokens depend on the token the previous step sampled:
                    # read it back and advance the matchers now, while this step's forward
                    # runs, then fill the bitmask this step samples with
                    if previous is not None:
                        outputs = self._collect(*previous)
                        previous = None
                    bitmask = self._bitmasks.fill(
                        [None if seq.is_finished else g
                         for seq, g in zip(sampled, grammars, strict=True)])
                step = self.runner.launch_sampling(forward, bitmask)
                for i, seq in enumerate(sampled):
                    seq.pending.launched(i)
                self._in_flight = step, sampled
        if previous is not None:
            outputs = self._collect(*previous)
        return outputs

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
            grammar = self._seq_grammars.get(seq.seq_id)
            if grammar is not None and grammar.accept(tok.token_id) and reason is None:
                reason = FinishReason.STOP  # the grammar took its stop token (even ignore_eos)
            if reason is not None:
                self._finish(seq, reason)
                out.finish_reason, out.stop_reason = reason, seq.stop_reason
            outputs.append(out)
        for rid in {o.request_id for o in outputs if o.finish_reason is not None}:
            self._forget_if_done(rid)
        return outputs

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self._seq_grammars.pop(seq.seq_id, None)
        self.scheduler.finish(seq, reason)
        self.block_tables.finish(seq.seq_id)

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self.seqs.get(request_id)
        if seqs is not None and all(s.is_finished for s in seqs):
            del self.seqs[request_id]
