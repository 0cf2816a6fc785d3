"""Turns a scheduled batch into tensors, runs the model over the paged KV cache, samples.

The runner makes no decisions: its `SchedulerOutput` (engine/batch.py) says which tokens of which
sequences to compute, which rows sample and how; the runner flattens them into one batch (prefill
chunks and decodes together, worker/input_batch.py), runs one forward, and samples one token for
every row marked to sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import overload

import torch

from flatout import distributed
from flatout.config import EngineConfig
from flatout.engine.batch import MultiModalItem, SamplingInfo, SchedulerOutput
from flatout.layers.attention import Attention, AttentionMetadata, forward_context
from flatout.layers.sampler import Sampler, SamplingBatch, SamplingRow, seeded_generator
from flatout.models.glm4v import Glm4vForConditionalGeneration
from flatout.models.glm4v_9b import ChatGLM4VForCausalLM
from flatout.models.registry import TORCH_DTYPES, load_model
from flatout.monitor.step_clock import StepClock, StepCost, measure_peak
from flatout.multimodal.preprocess import preprocess_fixed_size, preprocess_image
from flatout.worker.control import ControlChannel, StepMessage
from flatout.worker.cuda_graph import DecodeGraphs
from flatout.worker.input_batch import BlockTables, InputBatch, upload
from flatout.worker.kv_cache import (
    MemoryUse,
    allocate_kv_cache,
    kv_block_bytes,
    kv_cache_dtype,
    plan_num_blocks,
)
from flatout.worker.parallel import num_nodes

log = logging.getLogger(__name__)


@dataclass
class LaunchedStep:
    """A step queued on the device: its sampled rows' results on the way to the host (pinned
    buffers on CUDA, filled once `done` is reached)."""

    num_logprobs: list[int | None]  # per sampled row: top logprobs asked for (None: none)
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B]
    top_ids: torch.Tensor | None = None  # [B, K]
    top_logprobs: torch.Tensor | None = None  # [B, K]
    done: torch.cuda.Event | None = None


@dataclass
class LaunchedForward:
    """A step whose forward is queued and whose sampling is not yet."""

    batch: SchedulerOutput
    logits: torch.Tensor  # [sampled rows, V]


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """To the device without waiting (from pinned memory, which the caller keeps unchanged
    until the step is collected)."""
    if device.type == "cuda":
        return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
    return t.to(device)


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None
    top: dict[int, float] | None = None


class ModelRunner:
    """One tensor-parallel rank's model and KV cache (the only rank without parallelism).

    Rank 0 (the driver) broadcasts each step's `SchedulerOutput` to the other ranks
    (control.py), runs the forward and samples; the other ranks run the same forward from the
    message (tp_worker.py) and drop the logits."""

    def __init__(self, engine: EngineConfig, device: torch.device) -> None:
        config, cache, sched = engine.model, engine.cache, engine.scheduler
        self.config = config
        self.device = device
        self.dtype = TORCH_DTYPES[config.dtype]
        self.kv_dtype = kv_cache_dtype(cache, self.dtype, device)  # refuses before loading
        self.block_size = cache.block_size
        self.tp_rank, self.tp_size = distributed.get_tp_rank(), distributed.get_tp_size()
        self.model = load_model(config, device)
        # 2: the model takes [T, 2] positions (ChatGLM-6B v1's position and block position)
        self.position_dims: int = getattr(self.model, "position_dims", 1)
        self.memory = MemoryUse()
        if (self.tp_size > 1 and device.type == "cuda"
                and not engine.parallel.disable_custom_all_reduce and self.model.fuses_reduce):
            # before sizing the KV cache, which counts its buffers as runtime memory
            distributed.init_symmetric_reduce(
                sched.max_num_seqs, config.hidden_size, self.dtype, device,
                local_world=self.tp_size // num_nodes(),
            )
        if device.type == "cuda":
            self.memory.weights = torch.cuda.memory_allocated(device)
        self.attn_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.sampler = Sampler(device)
        self.generators: dict[int, torch.Generator] = {}
        # the last launched step's sampled tokens (rank 0, on the device); every rank counts
        # them (the size of the tokens' broadcast)
        self._prev_tokens: torch.Tensor | None = None
        self._num_prev_sampled = 0
        self.block_tables = BlockTables()  # every rank's copy, from each step's deltas
        # the vision encoder's outputs by image content hash: [image tokens, hidden] each,
        # added and dropped as each step's SchedulerOutput says (engine/encoder_cache.py)
        self.encoder_outputs: dict[bytes, torch.Tensor] = {}
        self.num_encoded_images = 0
        # each step's device time and work (busy fraction, MBU/MFU); the peaks are measured
        # before the KV cache takes the free memory
        run = engine.runner
        peak = measure_peak(device, self.dtype, run.peak_memory_bandwidth, run.peak_flops,
                            num_devices=engine.parallel.tensor_parallel_size)
        self.step_clock = StepClock(StepCost.of(config, cache.cache_dtype), device, peak)
        self._busy_base = 0.0  # step seconds at the last reset_busy_time()
        # every rank must hold as many blocks as the others: the scheduler plans for all of them
        self.num_blocks = distributed.min_over_ranks(
            plan_num_blocks(self.model, self.attn_layers, cache, sched, device, self.kv_dtype,
                            self.memory),
            device,
        )
        # rank 0 of several: broadcasts each step to the others (control.py)
        self.channel: ControlChannel | None = None
        if self.tp_size > 1 and self.tp_rank == 0:
            self.channel = ControlChannel()
        allocate_kv_cache(self.attn_layers, self.num_blocks, self.block_size, self.kv_dtype,
                          device)
        self.memory.kv_cache = self.num_blocks * kv_block_bytes(self.attn_layers,
                                                                self.block_size, self.kv_dtype)
        self.memory.kv_tokens = self.num_blocks * self.block_size
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not run.enforce_eager:
            self.graphs = DecodeGraphs(
                self.model,
                hidden_size=config.hidden_size,
                dtype=self.dtype,
                max_num_seqs=sched.max_num_seqs,
                max_blocks_per_seq=-(-config.max_model_len // self.block_size),
                block_size=self.block_size,
                device=self.device,
                position_dims=self.position_dims,
            )
            before = torch.cuda.memory_reserved(device)
            self.graphs.capture()
            self.memory.cuda_graphs = torch.cuda.memory_reserved(device) - before
        if device.type == "cuda":
            self.sampler.warm_up(device)
            log.info("rank %d memory: %s", self.tp_rank, self.memory.describe())

    # -- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: SchedulerOutput) -> LaunchedStep | None:
        """Rank 0: queue the step's forward and sampling on the device, and the copy of the
        sampled tokens to the host, without waiting for any of it (`collect` waits)."""
        forward = self.launch_forward(batch)
        return None if forward is None else self.launch_sampling(forward)

    @torch.inference_mode()
    def launch_forward(self, batch: SchedulerOutput) -> LaunchedForward | None:
        """Rank 0: queue the step's forward (None: no row samples; the step is complete).
        `launch_sampling` queues its sampling; the host may work in between (a grammar's
        bitmask is filled while the forward runs).

        A row whose input is the previous step's pending token takes it from that step's
        sampled tokens on the device."""
        if self.channel is not None:
            self.channel.send(StepMessage(batch))
        sampled = batch.sampled
        self.step_clock.begin(batch.num_new_tokens, [s.end for s in batch.seqs], len(sampled))
        logits = self.forward(batch)
        if logits is None:
            self.step_clock.end()
            self._prev_tokens = None
            return None
        return LaunchedForward(batch, logits)

    @torch.inference_mode()
    def launch_sampling(self, forward: LaunchedForward,
                        grammar_bitmask: torch.Tensor | None = None) -> LaunchedStep:
        """Queue the sampling of a launched forward. `grammar_bitmask`: [rows, ceil(V / 32)]
        int32 on the host, the tokens each sampled row may take (structured output)."""
        logits, sampled = forward.logits, forward.batch.sampled
        rows = [self._sampling_row(s.seq_id, s.sampling) for s in sampled if s.sampling]
        assert len(rows) == len(sampled), "a sampled row without its sampling info"
        sampling = SamplingBatch.build(rows, vocab_size=logits.shape[-1], device=self.device)
        if grammar_bitmask is not None:
            sampling.grammar_bitmask = _upload(grammar_bitmask, self.device)
        pending_of = [-1 if s.pending_row is None else s.pending_row for s in sampled]
        if sampling.output_ids is not None and any(r >= 0 for r in pending_of):
            sampling.output_ids = self._with_pending(sampling.output_ids, pending_of,
                                                     logits.shape[-1])
        out = self.sampler(logits.float(), sampling)
        self._prev_tokens = out.token_ids
        step = LaunchedStep(
            [s.sampling.num_logprobs for s in sampled if s.sampling],
            token_ids=self._to_host(out.token_ids),
            logprobs=self._to_host(out.logprobs),
            top_ids=self._to_host(out.top_ids),
            top_logprobs=self._to_host(out.top_logprobs),
        )
        if self.device.type == "cuda":
            step.done = torch.cuda.Event()
            step.done.record()
        self.step_clock.end()
        return step

    def collect(self, step: LaunchedStep) -> list[SampledToken]:
        """Wait for a launched step's tokens to reach the host and return them, one per
        sampled row in the step's order."""
        if step.done is not None:
            step.done.synchronize()
        token_ids = step.token_ids.tolist()
        logprobs = step.logprobs.tolist() if step.logprobs is not None else None
        top_ids = step.top_ids.tolist() if step.top_ids is not None else None
        top_lps = step.top_logprobs.tolist() if step.top_logprobs is not None else None
        result = []
        for i, k in enumerate(step.num_logprobs):
            tok = SampledToken(token_ids[i])
            if k is not None and logprobs is not None:
                tok.logprob = logprobs[i]
                if k:  # the sampler returns top ids and logprobs when any row asks for some
                    assert top_ids is not None and top_lps is not None
                    tok.top = dict(zip(top_ids[i][:k], top_lps[i][:k], strict=True))
                else:
                    tok.top = {}
            result.append(tok)
        return result

    @torch.inference_mode()
    def forward(self, batch: SchedulerOutput) -> torch.Tensor | None:
        """The forward every rank runs: the logits of the sampled rows (None if there are none).

        The same calls in the same order on every rank: the layers' collectives pair up."""
        for sid in batch.finished_seq_ids:
            self.generators.pop(sid, None)
        for h in batch.freed_encoder_hashes:
            self.encoder_outputs.pop(h, None)
        if batch.encoder_inputs:
            self._encode_images(batch.encoder_inputs)
        flat = InputBatch.build(batch, self.block_tables.apply(batch), self.block_size,
                                self.position_dims)
        t = flat.to_device(self.device)
        if flat.pending_at:  # the tokens sampled last step, read on the device (rank 0 has them)
            prev = self._prev_tokens
            if prev is None or self.tp_rank != 0:
                prev = torch.empty(self._num_prev_sampled, dtype=torch.long, device=self.device)
            distributed.broadcast_from_driver(prev)
            t.input_ids[t.pending_at] = prev[t.pending_rows]
        self._num_prev_sampled = len(flat.logits_rows)
        graphs = self.graphs
        max_query_len = flat.max_query_len
        if (graphs is not None and max_query_len == 1 and flat.num_rows <= graphs.max_bs
                and flat.mrope_positions is None and not flat.image_slices):
            hidden = graphs.replay(t.input_ids, t.positions, t.slot_mapping, t.seq_lens,
                                   t.block_tables)
        else:
            meta = AttentionMetadata(
                slot_mapping=t.slot_mapping,
                query_start_loc=t.query_start_loc.to(torch.int32),
                seq_lens=t.seq_lens.to(torch.int32),
                block_tables=t.block_tables.to(torch.int32),
                query_start_loc_cpu=flat.query_start_loc,
                seq_lens_cpu=flat.seq_lens,
                max_query_len=max_query_len,
                max_seq_len=max(flat.seq_lens),
                prefix_lens=None if t.prefix_lens is None else t.prefix_lens.to(torch.int32),
                prefix_lens_cpu=flat.prefix_lens if t.prefix_lens is not None else None,
            )
            with forward_context(meta):
                if flat.image_slices:
                    out = self.encoder_outputs
                    image_embeds = torch.cat([out[sl.content_hash][sl.first : sl.last]
                                              for sl in flat.image_slices])
                    hidden = self.model(t.input_ids, t.positions, image_embeds, t.image_index)
                else:
                    hidden = self.model(t.input_ids, t.positions)
        if not flat.logits_rows:
            return None
        if len(flat.logits_rows) != len(flat.input_ids):  # decode-only steps sample every row
            hidden = hidden[t.logits_rows]
        return self.model.compute_logits(hidden)

    def _encode_images(self, items: list[MultiModalItem]) -> None:
        """Preprocess the step's new images on the device and run the vision tower over all
        of them at once; each image's output ([its tokens, hidden]) is kept under its content
        hash. The uint8 pixels go up from pinned memory without making the host wait for the
        device's queue."""
        model = self.model
        if isinstance(model, ChatGLM4VForCausalLM):  # GLM-4V-9B: one fixed square per image
            size = model.eva.image_size
            images = torch.stack([
                preprocess_fixed_size(_upload(torch.from_numpy(item.pixels), self.device), size)
                for item in items
            ])  # fmt: skip
            embeds = model.encode_images(images).flatten(0, 1)
        elif isinstance(model, Glm4vForConditionalGeneration):
            vc = model.config.vision
            assert vc is not None
            pixel_values = torch.cat([
                preprocess_image(_upload(torch.from_numpy(item.pixels), self.device), item.resized,
                                 patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                 temporal_patch_size=vc.temporal_patch_size)
                for item in items
            ])  # fmt: skip
            embeds = model.encode_images(pixel_values, [item.grid_thw for item in items])
        else:
            raise ValueError(f"{self.config.architecture} takes no images")
        for item, out in zip(items, embeds.split([i.num_tokens for i in items]), strict=True):
            self.encoder_outputs[item.content_hash] = out
        self.num_encoded_images += len(items)

    def _with_pending(self, output_ids: torch.Tensor, pending_of: list[int], vocab: int
                      ) -> torch.Tensor:
        """Penalties count every output token: add each row's pending one (a column padded
        with `vocab`, the sampler's ignored id)."""
        assert self._prev_tokens is not None
        rows = [i for i, r in enumerate(pending_of) if r >= 0]
        rows_t, prev_t = upload(self.device, rows, [pending_of[i] for i in rows])
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

    def _sampling_row(self, seq_id: int, info: SamplingInfo) -> SamplingRow:
        generator = None
        if info.seed is not None:
            generator = self.generators.get(seq_id)
            if generator is None:
                generator = seeded_generator(info.seed, self.device)
                self.generators[seq_id] = generator
        return SamplingRow(
            params=info.params,
            prompt_token_ids=info.prompt_token_ids,
            output_token_ids=info.output_token_ids,
            generator=generator,
            banned_token_ids=info.banned_token_ids,
        )

    @overload
    def _to_host(self, t: torch.Tensor) -> torch.Tensor: ...
    @overload
    def _to_host(self, t: None) -> None: ...
    @overload
    def _to_host(self, t: torch.Tensor | None) -> torch.Tensor | None: ...
    def _to_host(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Start copying `t` to (pinned) host memory; `collect` waits for it."""
        if t is None or self.device.type != "cuda":
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def shutdown(self) -> None:
        """Rank 0: tell the other ranks to exit (they leave their loop after this message)."""
        if self.channel is not None:
            self.channel.send(StepMessage(stop=True))
            self.channel = None
