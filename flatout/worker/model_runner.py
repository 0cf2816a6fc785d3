"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples.

The runner makes no decisions: the scheduler said which tokens of which sequences to compute;
the runner flattens them into one batch (prefill chunks and decodes together), runs one forward,
and samples one token for every sequence whose tokens are now all computed.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from flatout import distributed
from flatout.config import EngineArgs, ModelConfig
from flatout.engine.request import Sequence
from flatout.engine.scheduler import SchedulerOutput
from flatout.layers.attention import Attention, AttentionMetadata, forward_context
from flatout.layers.sampler import Sampler, SamplingBatch, SamplingRow
from flatout.models.registry import TORCH_DTYPES, load_model
from flatout.monitor.step_clock import StepClock, StepCost, measure_peak
from flatout.worker.control import ControlChannel, DriverState, SeqWork, StepMessage
from flatout.worker.cuda_graph import DecodeGraphs
from flatout.worker.kv_cache import (
    MemoryUse,
    allocate_kv_cache,
    kv_block_bytes,
    plan_num_blocks,
)
from flatout.worker.parallel import num_nodes

log = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """A step queued on the device: its sampled sequences and their results on the way to the
    host (pinned buffers on CUDA, filled once `done` is reached)."""

    seqs: list[Sequence]
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B]
    top_ids: torch.Tensor | None = None  # [B, K]
    top_logprobs: torch.Tensor | None = None  # [B, K]
    done: torch.cuda.Event | None = None


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float | None = None
    top: dict[int, float] | None = None


class ModelRunner:
    """One tensor-parallel rank's model and KV cache (the only rank without parallelism).

    Rank 0 (the driver) turns each scheduled batch into `SeqWork`, broadcasts what changed to
    the other ranks (control.py), runs the forward and samples; the other ranks run the same
    forward from the message (tp_worker.py) and drop the logits."""

    def __init__(self, config: ModelConfig, args: EngineArgs, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.dtype = TORCH_DTYPES[config.dtype]
        self.block_size = args.block_size
        self.tp_rank, self.tp_size = distributed.get_tp_rank(), distributed.get_tp_size()
        self.model = load_model(config, device)
        self.memory = MemoryUse()
        if (self.tp_size > 1 and device.type == "cuda" and not args.disable_custom_all_reduce
                and self.model.fuses_reduce):
            # before sizing the KV cache, which counts its buffers as runtime memory
            distributed.init_symmetric_reduce(
                args.max_num_seqs, config.hidden_size, self.dtype, device,
                local_world=self.tp_size // num_nodes(),
            )
        if device.type == "cuda":
            self.memory.weights = torch.cuda.memory_allocated(device)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}
        # the last launched step's sampled tokens (rank 0, on the device) and row of each
        # sequence in them; every rank counts them (the size of the tokens' broadcast)
        self._prev_tokens: torch.Tensor | None = None
        self._prev_rows: dict[int, int] = {}
        self._num_prev_sampled = 0
        # each step's device time and work (busy fraction, MBU/MFU); the peaks are measured
        # before the KV cache takes the free memory
        peak = measure_peak(device, self.dtype, args.peak_memory_bandwidth, args.peak_flops,
                            num_devices=args.tensor_parallel_size)
        self.step_clock = StepClock(StepCost.of(config), device, peak)
        self._busy_base = 0.0  # step seconds at the last reset_busy_time()
        # every rank must hold as many blocks as the others: the scheduler plans for all of them
        self.num_blocks = distributed.min_over_ranks(
            plan_num_blocks(self.model, self.attn_layers, args, device, self.dtype, self.memory),
            device,
        )
        # rank 0 of several: broadcasts each step's changes to the others (control.py)
        self.channel: ControlChannel | None = None
        self.driver: DriverState | None = None
        if self.tp_size > 1 and self.tp_rank == 0:
            self.channel, self.driver = ControlChannel(), DriverState()
        allocate_kv_cache(self.attn_layers, self.num_blocks, args.block_size, self.dtype, device)
        self.memory.kv_cache = self.num_blocks * kv_block_bytes(self.attn_layers,
                                                                args.block_size, self.dtype)
        self.memory.kv_tokens = self.num_blocks * self.block_size
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not args.enforce_eager:
            self.graphs = DecodeGraphs(
                self.model,
                hidden_size=config.hidden_size,
                dtype=self.dtype,
                max_num_seqs=args.max_num_seqs,
                max_blocks_per_seq=-(-config.max_model_len // self.block_size),
                block_size=self.block_size,
                device=self.device,
            )
            before = torch.cuda.memory_reserved(device)
            self.graphs.capture()
            self.memory.cuda_graphs = torch.cuda.memory_reserved(device) - before
        if device.type == "cuda":
            log.info("rank %d memory: %s", self.tp_rank, self.memory.describe())

    # -- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> LaunchedStep | None:
        """Rank 0: queue the scheduled batch's forward and sampling on the device, and the copy
        of the sampled tokens to the host, without waiting for any of it (`collect` waits).

        A sequence whose last input token was sampled by the step launched just before (and is
        not read back yet) takes it from that step's sampled tokens on the device."""
        work: list[SeqWork] = []
        sampled_seqs: list[Sequence] = []
        pending_of: list[int] = []  # per sampled row: its input's row in the last step, or -1
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            end = start + n
            known = seq.token_ids[start:end]
            pending_row = -1
            if len(known) < n:  # its last input is the token sampled last step
                pending_row = self._prev_rows[seq.seq_id]
            sample = end == seq.num_tokens + seq.num_pending_tokens
            work.append(SeqWork(seq.seq_id, start, known, seq.block_table, sample, pending_row))
            if sample:
                sampled_seqs.append(seq)
                pending_of.append(pending_row)
        if self.channel is not None and self.driver is not None:
            preempted = [s.seq_id for s in sched.preempted]
            self.channel.send(self.driver.message(work, preempted))
        self.step_clock.begin(sched.num_new_tokens,
                              [w.start + w.num_tokens for w in work], len(sampled_seqs))
        logits = self.forward(work)
        if logits is None:
            self.step_clock.end()
            self._prev_tokens, self._prev_rows = None, {}
            return None
        batch = SamplingBatch.build(
            [self._sampling_row(s) for s in sampled_seqs],
            vocab_size=logits.shape[-1],
            device=self.device,
        )
        if batch.output_ids is not None and any(r >= 0 for r in pending_of):
            batch.output_ids = self._with_pending(batch.output_ids, pending_of, logits.shape[-1])
        out = self.sampler(logits.float(), batch)
        self._prev_tokens = out.token_ids
        self._prev_rows = {seq.seq_id: i for i, seq in enumerate(sampled_seqs)}
        step = LaunchedStep(
            sampled_seqs,
            *(self._to_host(t) for t in (out.token_ids, out.logprobs, out.top_ids,
                                          out.top_logprobs)),
        )
        if self.device.type == "cuda":
            step.done = torch.cuda.Event()
            step.done.record()
        self.step_clock.end()
        return step

    def collect(self, step: LaunchedStep) -> list[SampledToken]:
        """Wait for a launched step's tokens to reach the host and return them."""
        if step.done is not None:
            step.done.synchronize()
        token_ids = step.token_ids.tolist()
        logprobs = step.logprobs.tolist() if step.logprobs is not None else None
        top_ids = step.top_ids.tolist() if step.top_ids is not None else None
        top_lps = step.top_logprobs.tolist() if step.top_logprobs is not None else None
        result = []
        for i, seq in enumerate(step.seqs):
            tok = SampledToken(seq, token_ids[i])
            k = seq.params.logprobs
            if k is not None and logprobs is not None:
                tok.logprob = logprobs[i]
                tok.top = dict(zip(top_ids[i][:k], top_lps[i][:k], strict=True)) if k else {}
            result.append(tok)
        return result

    @torch.inference_mode()
    def forward(self, work: list[SeqWork]) -> torch.Tensor | None:
        """The forward every rank runs: the logits of the sampled rows (None if there are none).

        The same calls in the same order on every rank: the layers' collectives pair up."""
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        pending_at: list[int] = []  # flat positions whose token comes from the last step
        pending_rows: list[int] = []  # ... from this row of its sampled tokens
        tables: list[int] = []
        bs = self.block_size
        max_blocks = max(len(w.block_table) for w in work)
        for w in work:
            n = w.num_tokens
            start, end = w.start, w.start + n
            input_ids.extend(w.token_ids)
            if w.pending_row >= 0:
                pending_at.append(len(input_ids))
                pending_rows.append(w.pending_row)
                input_ids.append(0)  # replaced on the device
            positions.extend(range(start, end))
            table = w.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            tables.extend(table)
            tables.extend([0] * (max_blocks - len(table)))
            if w.sample:
                logits_rows.append(query_start[-1] - 1)

        # every index tensor of the step in one host-to-device copy
        ids_t, pos_t, slot_t, rows_t, pend_at_t, pend_rows_t, qsl_t, lens_t, tables_t = (
            self._upload(input_ids, positions, slots, logits_rows, pending_at, pending_rows,
                         query_start, seq_lens, tables)
        )
        if pending_at:  # the tokens sampled last step, read on the device (rank 0 has them)
            prev = self._prev_tokens
            if prev is None or self.tp_rank != 0:
                prev = torch.empty(self._num_prev_sampled, dtype=torch.long, device=self.device)
            distributed.broadcast_from_driver(prev)
            ids_t[pend_at_t] = prev[pend_rows_t]
        self._num_prev_sampled = len(logits_rows)
        tables_t = tables_t.view(len(work), max_blocks)
        graphs = self.graphs
        max_query_len = max(w.num_tokens for w in work)
        if graphs is not None and max_query_len == 1 and len(work) <= graphs.max_bs:
            hidden = graphs.replay(ids_t, pos_t, slot_t, lens_t, tables_t)
        else:
            meta = AttentionMetadata(
                slot_mapping=slot_t,
                query_start_loc=qsl_t.to(torch.int32),
                seq_lens=lens_t.to(torch.int32),
                block_tables=tables_t.to(torch.int32),
                query_start_loc_cpu=query_start,
                seq_lens_cpu=seq_lens,
                max_query_len=max_query_len,
                max_seq_len=max(seq_lens),
            )
            with forward_context(meta):
                hidden = self.model(ids_t, pos_t)
        if not logits_rows:
            return None
        if len(logits_rows) != len(input_ids):  # decode-only steps sample every row
            hidden = hidden[rows_t]
        return self.model.compute_logits(hidden)

    def _upload(self, *lists: list[int]) -> list[torch.Tensor]:
        """int64 device tensors of `lists`, through one pinned buffer and one asynchronous copy
        (a copy from pageable memory would make the host wait for the device's queue)."""
        sizes = [len(x) for x in lists]
        flat = np.fromiter(itertools.chain.from_iterable(lists), np.int64, sum(sizes))
        if self.device.type == "cuda":
            host = torch.empty(len(flat), dtype=torch.int64, pin_memory=True)
            host.numpy()[:] = flat
            dev = host.to(self.device, non_blocking=True)
        else:
            dev = torch.from_numpy(flat)
        return list(dev.split(sizes))

    def _with_pending(self, output_ids: torch.Tensor, pending_of: list[int], vocab: int
                      ) -> torch.Tensor:
        """Penalties count every output token: add each row's pending one (a column padded
        with `vocab`, the sampler's ignored id)."""
        assert self._prev_tokens is not None
        rows = [i for i, r in enumerate(pending_of) if r >= 0]
        rows_t, prev_t = self._upload(rows, [pending_of[i] for i in rows])
        col = torch.full((output_ids.shape[0],), vocab, dtype=torch.long, device=self.device)
        col[rows_t] = self._prev_tokens[prev_t]
        return torch.cat([output_ids, col[:, None]], dim=1)

    def reset_busy_time(self) -> None:
        self._busy_base = self.busy_time(since_reset=False)

    def busy_time(self, since_reset: bool = True) -> float:
        """Seconds the device spent inside steps (first kernel to last) since the last reset;
        waits for the steps in flight."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        total = sum(t.seconds for t in self.step_clock.totals().values())
        return total - (self._busy_base if since_reset else 0.0)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        p = seq.params
        banned: list[int] = []
        if seq.num_generated_tokens < p.min_tokens:
            banned = list(p.stop_token_ids or [])
            if not p.ignore_eos:
                banned += seq.eos_token_ids
        generator = None
        if p.seed is not None:
            generator = self.generators.get(seq.seq_id)
            if generator is None:
                generator = torch.Generator(self.device)
                generator.manual_seed(p.seed + seq.index)
                self.generators[seq.seq_id] = generator
        return SamplingRow(
            params=p,
            prompt_token_ids=seq.prompt_token_ids,
            output_token_ids=seq.output_token_ids,
            generator=generator,
            banned_token_ids=banned,
        )

    def _to_host(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Start copying `t` to (pinned) host memory; `collect` waits for it."""
        if t is None or self.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def release(self, seq: Sequence) -> None:
        """Forget per-sequence state (its generator, the workers' block table) once finished."""
        self.generators.pop(seq.seq_id, None)
        if self.driver is not None:
            self.driver.release(seq.seq_id)

    def shutdown(self) -> None:
        """Rank 0: tell the other ranks to exit (they leave their loop after this message)."""
        if self.channel is not None:
            self.channel.send(StepMessage(stop=True))
            self.channel = None
