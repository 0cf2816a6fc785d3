"""Memory planning from the config alone: will this model fit these GPUs, and how well?

    flatout plan --model glm-4-9b --gpus 2x24GB [--tp 2] [--max-model-len 32768] \
                 [--kv-cache-dtype fp8]

Per GPU (one tensor-parallel rank each): the weight shard (vocab-parallel embedding and head,
heads split, KV heads replicated when ranks outnumber them), an activation reserve for the
largest batch the scheduler forms (for a vision model also the tower over the largest image),
the runtime overhead, and what is left for the KV cache, in tokens and in concurrent sequences at
a context length; the decode floor per step is the bytes one step must read (weights + KV) at
the GPU's memory bandwidth. An fp8 KV cache stores one byte per value (half of bf16's), so the
same memory holds twice the tokens and a decode step reads half the KV bytes. The engine refuses
at startup, with the same text, a configuration this says cannot fit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flatout.config import (
    ModelConfig,
    kv_cache_element_bytes,
    normalize_kv_cache_dtype,
    parse_int4_method,
    quantized_linear_bytes,
)
from flatout.multimodal.image_size import MAX_PIXELS

GIB = 1 << 30
# memory (GiB as sold, i.e. 1e9 bytes) and bandwidth (bytes/s) of common GPUs
KNOWN_GPUS: dict[str, tuple[float, float]] = {
    "RTX3090": (24, 936e9), "RTX4090": (24, 1008e9), "A10": (24, 600e9), "L4": (24, 300e9),
    "A6000": (48, 768e9), "L40S": (48, 864e9), "A100-40GB": (40, 1555e9),
    "A100-80GB": (80, 2039e9), "H100": (80, 3350e9), "H100-PCIE": (80, 2000e9),
    "H200": (141, 4800e9), "B200": (180, 8000e9),
}
DEFAULT_BANDWIDTH = 1000e9  # when only a size is given (a 24 GB consumer card is ~1 TB/s)
# outside torch's allocator: CUDA context, cuBLAS workspaces, CUDA graph pool; tensor parallel
# adds NCCL's communicators and buffers (1.49 GiB measured per rank at TP 2 on H200, torch 2.11:
# benchmarks/results/check_plan_h200x2_glm-4-9b.md)
RUNTIME_OVERHEAD = int(0.75 * GIB)
TP_RUNTIME_OVERHEAD = int(1.5 * GIB)


def runtime_overhead(tp: int) -> int:
    return RUNTIME_OVERHEAD if tp == 1 else TP_RUNTIME_OVERHEAD


@dataclass(frozen=True)
class GpuSpec:
    count: int
    memory: int  # bytes per GPU
    bandwidth: float  # bytes/s per GPU
    name: str
    bandwidth_known: bool


def parse_gpus(spec: str, bandwidth: float | None = None) -> GpuSpec:
    """"2x24GB", "4x80GiB", "2xH100", "H200" (one), with an optional bandwidth override."""
    m = re.fullmatch(r"\s*(?:(\d+)\s*[xX*]\s*)?(.+?)\s*", spec)
    if not m:
        raise ValueError(f"cannot read --gpus {spec!r}: use e.g. 2x24GB or 2xH100")
    count, what = int(m.group(1) or 1), m.group(2)
    known = {k.upper(): (k, v) for k, v in KNOWN_GPUS.items()}
    if what.upper() in known:
        name, (gb, bw) = known[what.upper()]
        return GpuSpec(count, int(gb * 1e9), bandwidth or bw, name, True)
    size = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(GB|GIB|G)", what.upper())
    if not size:
        raise ValueError(
            f"unknown GPU {what!r} in --gpus: give a size (24GB, 80GiB) or one of "
            f"{', '.join(KNOWN_GPUS)}"
        )
    unit = GIB if size.group(2) == "GIB" else 1e9
    mem = int(float(size.group(1)) * unit)
    return GpuSpec(count, mem, bandwidth or DEFAULT_BANDWIDTH, f"{what}", bandwidth is not None)


def rank_param_count(cfg: ModelConfig, tp: int) -> int:
    """Parameters one rank holds (the largest shard: vocab rows are ceil-divided)."""
    h, hd = cfg.hidden_size, cfg.head_dim
    q = cfg.num_attention_heads // tp * hd
    kv = max(1, cfg.num_key_value_heads // tp) * hd
    attn = h * (q + 2 * kv) + q * h + ((q + 2 * kv) if cfg.attention_bias else 0)
    attn += h if cfg.o_proj_bias else 0
    mlp = 3 * h * (cfg.intermediate_size // tp)
    norms = h * (4 if cfg.sandwich_norm else 2) + (2 * hd if cfg.qk_norm else 0)
    if cfg.position_encoding_2d:  # ChatGLM-6B v1: a plain GELU MLP, biases and LayerNorms
        i = cfg.intermediate_size // tp
        mlp = 2 * h * i + i + h
        norms = 4 * h
    vocab = -(-cfg.vocab_size // tp) * h
    embed = vocab * (1 if cfg.tie_word_embeddings else 2)
    final_norm = 2 * h if cfg.position_encoding_2d else h
    tower = cfg.eva_vision.rank_num_params(tp) if cfg.eva_vision is not None else 0
    return cfg.num_hidden_layers * (attn + mlp + norms) + embed + final_norm + tower


def rank_weight_bytes(cfg: ModelConfig, tp: int) -> int:
    """Bytes of one rank's weights: quantized linears at one byte per weight plus their fp32
    per-channel scales (4-bit: half a byte plus per-group scales and zero points), everything
    else in the model dtype."""
    return cfg.quantized_weight_bytes(rank_param_count(cfg, tp), tp)


def rank_tower_bytes(cfg: ModelConfig, tp: int) -> int:
    """Bytes of one rank's share of GLM-4V-9B's EVA tower (0 for other models): weights a
    decode step never reads."""
    eva = cfg.eva_vision
    if eva is None:
        return 0
    b = cfg.dtype_bytes
    total = eva.rank_num_params(tp) * b
    if cfg.quantization is None:
        return total
    weights, _ = eva.rank_quantized_counts(tp)
    stored = sum(count * quantized_linear_bytes(cfg.quantization, rows, cols)
                 for count, rows, cols in eva.rank_quantized_linears(tp))
    return total - weights * b + stored


def kv_bytes_per_token_per_rank(cfg: ModelConfig, tp: int, kv_cache_dtype: str = "auto") -> int:
    kv = max(1, cfg.num_key_value_heads // tp)
    elem = kv_cache_element_bytes(kv_cache_dtype, cfg.dtype)
    return 2 * cfg.num_hidden_layers * kv * cfg.head_dim * elem


def activation_reserve(cfg: ModelConfig, tp: int, max_tokens: int, max_seqs: int) -> int:
    """Peak activations of one forward over `max_tokens` tokens, plus sampling up to `max_seqs`
    rows over the gathered vocabulary: bf16 and fp32 logits, probabilities, and a full sort
    (values, int64 indices, scratch) for top-p — 32 bytes per row and token id, as measured
    (benchmarks/results/check_plan_h200x2_glm-4-9b.md)."""
    h, b = cfg.hidden_size, cfg.dtype_bytes
    q = cfg.num_attention_heads * cfg.head_dim // tp
    kv = max(1, cfg.num_key_value_heads // tp) * cfg.head_dim
    inter = cfg.intermediate_size // tp
    per_token = (4 * h + 2 * (q + 2 * kv) + 3 * inter) * b
    rows = min(max_seqs, max_tokens)
    # int8 and 4-bit linears past the GEMV's rows convert their weight to the model dtype for
    # cuBLAS: the largest such copy (gate_up, or the LM head when it is quantized)
    converted = 0
    if cfg.quantization == "int8" or parse_int4_method(cfg.quantization or "") is not None:
        vocab = -(-cfg.vocab_size // tp) if cfg.quantize_lm_head else 0
        converted = max(2 * inter, vocab) * h * b
    text = max_tokens * per_token + rows * cfg.vocab_size * 32 + converted
    if cfg.eva_vision is not None:  # GLM-4V-9B: the step's images, then their cached rows
        eva = cfg.eva_vision
        tower = eva_activation_reserve(cfg, tp, eva.images_per_step(max_tokens))
        return max(text, tower) + max(max_tokens, eva.num_image_tokens) * h * b
    if cfg.vision is None:
        return text
    # the tower runs before the forward (not beside it); its outputs wait in the encoder cache
    # (up to max_tokens embeddings)
    return max(text, vision_activation_reserve(cfg)) + max_tokens * h * b


def vision_activation_reserve(cfg: ModelConfig) -> int:
    """Peak activations of the vision tower over the largest image the default max_pixels
    admits (as the runner profiles it, flatout/worker/kv_cache.py): the float32 patches and
    their cast, and per patch a block's residual, qkv, attention output and SwiGLU widths."""
    vc = cfg.vision
    assert vc is not None
    n = MAX_PIXELS // (vc.temporal_patch_size * vc.patch_size**2)
    h, o, b = vc.hidden_size, vc.out_hidden_size, cfg.dtype_bytes
    return n * (vc.patch_dim * (4 + b) + (6 * h + 3 * o) * b)


def eva_activation_reserve(cfg: ModelConfig, tp: int, images: int) -> int:
    """Peak activations of GLM-4V-9B's EVA tower over `images` images at once (the runner
    encodes a step's images together; the profile runs the same, flatout/worker/kv_cache.py):
    per image its preprocessed pixels (float32, and their cast), then the larger of a block's
    widths per token (residual, branch output and norm; this rank's q|k|v, attention output,
    and the GELU MLP's input and output, the attention itself in flash form, no L x L scores)
    and the adapter's per embedding (conv output, projection, norm; this rank's gate|up and
    their product)."""
    eva = cfg.eva_vision
    assert eva is not None
    b = cfg.dtype_bytes
    n, h, i = eva.grid**2 + 1, eva.hidden_size, eva.intermediate_size
    m, o, g = eva.num_patch_embeds, eva.out_hidden_size, eva.glu_intermediate_size
    pixels = eva.in_channels * eva.image_size**2 * (4 + b)
    block = n * (3 * h + (4 * h + 2 * i) // tp) * b
    adapter = m * (3 * o + 3 * g // tp) * b
    return images * (pixels + max(block, adapter))


@dataclass(frozen=True)
class Plan:
    cfg: ModelConfig
    gpus: GpuSpec
    tp: int
    utilization: float
    weights: int  # bytes per GPU
    activations: int
    overhead: int
    kv_budget: int
    kv_per_token: int
    block_size: int
    context: int
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype) | "fp8"
    tower: int = 0  # bytes of the weights that are GLM-4V-9B's EVA tower (per GPU)

    @property
    def kv_tokens(self) -> int:
        if self.kv_budget <= 0:
            return 0
        return self.kv_budget // (self.kv_per_token * self.block_size) * self.block_size

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= self.cfg.max_model_len

    def decode_floor(self, batch: int) -> float:
        """Seconds per decode step at `batch` sequences of `context` tokens (bytes / bandwidth;
        a vision tower's weights are not read by a decode step)."""
        read = self.weights - self.tower + batch * self.context * self.kv_per_token
        return read / self.gpus.bandwidth

    def reason(self) -> str:
        """Why it does not fit, and what would (empty if it fits)."""
        if self.fits:
            return ""
        usable = self.gpus.memory * self.utilization
        if self.kv_budget <= 0:
            need = self.weights + self.activations + self.overhead
            return (
                f"weights ({self.weights / GIB:.1f} GiB) + activations "
                f"({self.activations / GIB:.1f} GiB) + runtime ({self.overhead / GIB:.1f} GiB) "
                f"= {need / GIB:.1f} GiB per GPU exceed the {usable / GIB:.1f} GiB usable "
                f"({self.utilization:.0%} of {self.gpus.memory / GIB:.1f} GiB): use more GPUs "
                f"(a larger --tensor-parallel-size) or lower --max-num-batched-tokens"
            )
        return (
            f"the KV cache holds {self.kv_tokens} tokens per GPU, less than one sequence of "
            f"max_model_len {self.cfg.max_model_len}: lower --max-model-len to at most "
            f"{self.kv_tokens} or use more GPUs"
        )

    def lines(self) -> list[str]:
        cfg, g = self.cfg, self.gpus
        bw = f"{g.bandwidth / 1e9:.0f} GB/s" + ("" if g.bandwidth_known else " (assumed; "
                                                  "pass --gpu-bandwidth)")
        seqs = self.kv_tokens // self.context if self.context else 0
        quant = ""
        if cfg.quantization:
            head = " and LM head" if cfg.quantize_lm_head else ""
            tower = ", vision tower's too" if cfg.eva_vision is not None else ""
            quant = f" (linears{head} {cfg.quantization}{tower})"
        out = [
            f"model     {cfg.model} ({cfg.architecture}), {cfg.num_params / 1e9:.2f} B params, "
            f"{cfg.dtype}{quant}, max_model_len {cfg.max_model_len}",
            f"GPUs      {g.count} x {g.name} ({g.memory / GIB:.1f} GiB, {bw}); tensor parallel "
            f"{self.tp}; gpu_memory_utilization {self.utilization}",
            "per GPU:",
            f"  weights       {self.weights / GIB:8.2f} GiB"
            + (f" (vision tower {self.tower / GIB:.2f} GiB of it, not read by decode steps)"
               if self.tower else ""),
            f"  activations   {self.activations / GIB:8.2f} GiB (reserve for the largest batch)",
            f"  runtime       {self.overhead / GIB:8.2f} GiB (CUDA context, NCCL, graphs)",
            f"  KV cache      {max(self.kv_budget, 0) / GIB:8.2f} GiB = {self.kv_tokens} tokens "
            f"({self.kv_per_token / 1024:.1f} KiB/token on each GPU, "
            f"{'float8_e4m3fn' if self.kv_cache_dtype == 'fp8' else cfg.dtype})",
            f"  concurrency   {seqs} sequences of {self.context} tokens",
            f"decode floor  {self.decode_floor(1) * 1e3:.2f} ms/step at batch 1, "
            f"{self.decode_floor(32) * 1e3:.2f} ms at batch 32 (context {self.context})",
        ]
        if g.count > self.tp:
            out.append(f"note      {g.count // self.tp} replicas of tensor-parallel size "
                       f"{self.tp} fit these GPUs (run one server per replica)")
        out.append("fits      yes" if self.fits else f"fits      NO: {self.reason()}")
        return out


def make_plan(
    cfg: ModelConfig, gpus: GpuSpec, tp: int | None = None, *, utilization: float = 0.9,
    max_num_batched_tokens: int = 4096, max_num_seqs: int = 256, block_size: int = 16,
    context: int | None = None, kv_cache_dtype: str = "auto",
) -> Plan:
    from flatout.worker.parallel import check_tensor_parallel

    tp = tp or gpus.count
    if tp > gpus.count:
        raise ValueError(f"tensor parallel {tp} needs {tp} GPUs; --gpus gives {gpus.count}")
    check_tensor_parallel(cfg, tp)
    weights = rank_weight_bytes(cfg, tp)
    act = activation_reserve(cfg, tp, max_num_batched_tokens, max_num_seqs)
    overhead = runtime_overhead(tp)
    budget = int(gpus.memory * utilization) - weights - act - overhead
    kv_cache_dtype = normalize_kv_cache_dtype(kv_cache_dtype)
    return Plan(cfg, gpus, tp, utilization, weights, act, overhead, budget,
                kv_bytes_per_token_per_rank(cfg, tp, kv_cache_dtype), block_size,
                min(context or cfg.max_model_len, cfg.max_model_len), kv_cache_dtype,
                rank_tower_bytes(cfg, tp))


def run_plan(ns: Any) -> int:
    """`flatout plan` (its arguments: flatout.cli_args.add_plan_args)."""
    from flatout.models.registry import resolve_model_config

    model = ns.model
    if model is None:
        from flatout.demo import demo_model_path

        model = demo_model_path()
    cfg = resolve_model_config(model, dtype=ns.dtype, device_type="cuda",
                               max_model_len=ns.max_model_len, load_format="dummy",
                               quantization=ns.quantization,
                               quantize_lm_head=ns.quantize_lm_head)
    bw = ns.gpu_bandwidth * 1e9 if ns.gpu_bandwidth else None
    plan = make_plan(
        cfg, parse_gpus(ns.gpus, bw), ns.tp,
        utilization=ns.gpu_memory_utilization,
        max_num_batched_tokens=ns.max_num_batched_tokens,
        max_num_seqs=ns.max_num_seqs, context=ns.context, kv_cache_dtype=ns.kv_cache_dtype,
    )
    print("\n".join(plan.lines()))
    return 0 if plan.fits else 1


def check_fits(cfg: ModelConfig, args: Any, total_memory: int, gpu_name: str = "GPU") -> Plan:
    """The engine's startup check on GPUs: raise ValueError with the plan when the
    configuration cannot fit (before any weight is loaded), else return the plan."""
    tp = args.tensor_parallel_size
    bw = args.peak_memory_bandwidth or DEFAULT_BANDWIDTH
    gpus = GpuSpec(tp, total_memory, bw, gpu_name, args.peak_memory_bandwidth is not None)
    plan = make_plan(cfg, gpus, tp, utilization=args.gpu_memory_utilization,
                     max_num_batched_tokens=args.max_num_batched_tokens,
                     max_num_seqs=args.max_num_seqs, block_size=args.block_size,
                     kv_cache_dtype=args.kv_cache_dtype)
    fixed_kv = args.num_kv_blocks is not None or args.kv_cache_memory is not None
    if not plan.fits and not (fixed_kv and plan.kv_budget > 0):
        raise ValueError(
            "this configuration cannot fit: " + plan.reason() + "\n" + "\n".join(plan.lines())
        )
    return plan
