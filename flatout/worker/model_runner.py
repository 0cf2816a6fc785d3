"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples.

The runner makes no decisions: the scheduler said which tokens of which sequences to compute;
the runner flattens them into one batch (prefill chunks and decodes together), runs one forward,
and samples one token for every sequence whose tokens are now all computed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from flatout.config import EngineArgs, ModelConfig
from flatout.engine.request import Sequence
from flatout.engine.scheduler import SchedulerOutput
from flatout.layers.attention import Attention, AttentionMetadata, forward_context
from flatout.layers.sampler import Sampler, SamplerOutput, SamplingBatch, SamplingRow
from flatout.models.registry import load_model
from flatout.worker.cuda_graph import DecodeGraphs

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CPU_DEFAULT_KV_CACHE_MEMORY = 1 << 30


@dataclass
class SampledToken:
    seq: Sequence
    token_id: int
    logprob: float | None = None
    top: dict[int, float] | None = None


class ModelRunner:
    def __init__(self, config: ModelConfig, args: EngineArgs, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.dtype = _TORCH_DTYPES[config.dtype]
        self.block_size = args.block_size
        self.model: nn.Module = load_model(config, device)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler()
        self.generators: dict[int, torch.Generator] = {}
        self.num_blocks = self._plan_num_blocks(args)
        self._allocate_kv_cache()
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
            self.graphs.capture()
        # CUDA events around each step's GPU work, for the busy fraction (GPU only)
        self._events: deque[tuple[torch.cuda.Event, torch.cuda.Event]] = deque(maxlen=1 << 16)

    # -- KV cache ---------------------------------------------------------------------------
    @property
    def block_bytes(self) -> int:
        return self.config.kv_bytes_per_token * self.block_size

    def _plan_num_blocks(self, args: EngineArgs) -> int:
        if args.num_kv_blocks is not None:
            return args.num_kv_blocks
        if self.device.type != "cuda":
            budget = args.kv_cache_memory or CPU_DEFAULT_KV_CACHE_MEMORY
            return max(1, budget // self.block_bytes)
        if args.kv_cache_memory is not None:
            return max(1, args.kv_cache_memory // self.block_bytes)
        peak = self._profile_peak_memory(args.max_num_batched_tokens, args.max_num_seqs)
        free, total = torch.cuda.mem_get_info(self.device)
        not_torch = (total - free) - torch.cuda.memory_reserved(self.device)
        budget = int(total * args.gpu_memory_utilization) - peak - not_torch
        num_blocks = budget // self.block_bytes
        if num_blocks < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache: weights and activations take "
                f"{peak / 2**30:.2f} GiB of {total * args.gpu_memory_utilization / 2**30:.2f} GiB "
                f"(gpu_memory_utilization={args.gpu_memory_utilization}); raise it or lower "
                f"max_num_batched_tokens"
            )
        return num_blocks

    @torch.inference_mode()
    def _profile_peak_memory(self, num_tokens: int, num_seqs: int) -> int:
        """Peak bytes of a forward over the largest batch the scheduler can form."""
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        num_seqs = max(1, min(num_seqs, num_tokens))
        lens = [num_tokens // num_seqs] * num_seqs
        lens[-1] += num_tokens - sum(lens)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.cat([torch.arange(n, device=self.device) for n in lens])
        with forward_context(AttentionMetadata.for_prefill_without_cache(lens, self.device)):
            hidden = self.model(ids, pos)
        ends = torch.tensor(lens, device=self.device).cumsum(0) - 1
        logits = self.model.compute_logits(hidden[ends])
        torch.softmax(logits, dim=-1)
        del hidden, logits
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        return peak

    def _allocate_kv_cache(self) -> None:
        # zeroed on the GPU (kernels mask unused slots but must never meet NaN garbage); left
        # uninitialised on the CPU so that untouched blocks never take resident memory
        alloc = torch.zeros if self.device.type == "cuda" else torch.empty
        for layer in self.attn_layers:
            shape = (self.num_blocks, self.block_size, layer.num_kv_heads, layer.head_dim)
            layer.k_cache = alloc(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = alloc(shape, dtype=self.dtype, device=self.device)

    # -- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> list[SampledToken]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        logits_rows: list[int] = []
        sampled_seqs: list[Sequence] = []
        bs = self.block_size
        for seq, n in zip(sched.seqs, sched.num_new_tokens, strict=True):
            start = seq.num_computed_tokens
            end = start + n
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start.append(query_start[-1] + n)
            seq_lens.append(end)
            if end == seq.num_tokens:  # all tokens computed: this step yields its next token
                logits_rows.append(query_start[-1] - 1)
                sampled_seqs.append(seq)

        max_blocks = max(len(s.block_table) for s in sched.seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in sched.seqs]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            query_start_loc_cpu=query_start,
            seq_lens_cpu=seq_lens,
            max_query_len=max(sched.num_new_tokens),
            max_seq_len=max(seq_lens),
        )
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
        events = None
        if dev.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
            self._events.append(events)
        graphs = self.graphs
        if graphs is not None and meta.is_decode_only and len(sched.seqs) <= graphs.max_bs:
            hidden = graphs.replay(
                ids_t, pos_t, meta.slot_mapping, meta.seq_lens, meta.block_tables
            )
        else:
            with forward_context(meta):
                hidden = self.model(ids_t, pos_t)
        if not sampled_seqs:
            if events is not None:
                events[1].record()
            return []
        if len(logits_rows) != len(input_ids):  # decode-only steps sample every row
            hidden = hidden[torch.tensor(logits_rows, device=dev)]
        logits = self.model.compute_logits(hidden)
        batch = SamplingBatch.build(
            [self._sampling_row(s) for s in sampled_seqs],
            vocab_size=logits.shape[-1],
            device=dev,
        )
        out = self.sampler(logits.float(), batch)
        if events is not None:
            events[1].record()
        return self._to_host(sampled_seqs, out)

    def reset_busy_time(self) -> None:
        self._events.clear()

    def busy_time(self) -> float:
        """Seconds the GPU spent inside steps (first kernel to last) since the last reset."""
        if not self._events:
            return 0.0
        self._events[-1][1].synchronize()
        return sum(s.elapsed_time(e) for s, e in self._events) / 1e3

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        p = seq.params
        banned: list[int] = []
        if seq.num_output_tokens < p.min_tokens:
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

    @staticmethod
    def _to_host(seqs: list[Sequence], out: SamplerOutput) -> list[SampledToken]:
        # the step's single device-to-host transfer of results
        token_ids = out.token_ids.tolist()
        logprobs = out.logprobs.tolist() if out.logprobs is not None else None
        top_ids = out.top_ids.tolist() if out.top_ids is not None else None
        top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
        result = []
        for i, seq in enumerate(seqs):
            tok = SampledToken(seq, token_ids[i])
            k = seq.params.logprobs
            if k is not None and logprobs is not None:
                tok.logprob = logprobs[i]
                tok.top = dict(zip(top_ids[i][:k], top_lps[i][:k], strict=True)) if k else {}
            result.append(tok)
        return result

    def release(self, seq: Sequence) -> None:
        """Forget per-sequence state (its generator) once it finished."""
        self.generators.pop(seq.seq_id, None)
