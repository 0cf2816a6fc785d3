"""Frozen configuration objects. `EngineArgs` is what users pass (LLM(...) keywords, CLI flags);
`EngineArgs.resolve(model_config)` turns it into one frozen config per component (`EngineConfig`),
built before anything is loaded; each component receives only its own."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

# weight quantization methods (--quantization): int8 = W8A16, fp8 = W8A8 e4m3, both symmetric
# with one scale per output channel; w4a16 = 4-bit weights, symmetric, one scale per group of
# 128 inputs (a pre-quantized 4-bit checkpoint is served as its own "w4a16-g<size>[-asym]" or
# "w4a16-channel[-asym]", which --quantization w4a16 accepts too)
QUANTIZATION_METHODS = ("int8", "fp8", "w4a16")
INT4_DEFAULT_GROUP = 128  # plain "w4a16": groups of 128 inputs, symmetric


def parse_int4_method(method: str) -> tuple[int, bool] | None:
    """(group size, 0 = per channel; zero points?) of a 4-bit method ("w4a16",
    "w4a16-g64-asym", "w4a16-channel", ...); None for a method of another family."""
    if method != "w4a16" and not method.startswith("w4a16-"):
        return None
    parts = method.split("-")[1:]
    zero_point = bool(parts) and parts[-1] == "asym"
    if zero_point:
        parts = parts[:-1]
    group = INT4_DEFAULT_GROUP
    if parts == ["channel"]:
        group = 0
    elif len(parts) == 1 and parts[0].startswith("g") and parts[0][1:].isdigit() \
            and int(parts[0][1:]) > 0:
        group = int(parts[0][1:])
    elif parts:
        raise ValueError(f"quantization: malformed 4-bit method {method!r} (w4a16, "
                         "w4a16-g<group size>, w4a16-channel, each optionally -asym)")
    if group % 32:
        raise ValueError(f"quantization {method}: group size {group} is not a multiple of 32")
    return group, zero_point


def quantized_linear_bytes(method: str, rows: int, cols: int) -> int:
    """Bytes of a [rows, cols] linear held in a quantized format: one byte a weight plus an
    fp32 scale a row (int8, fp8), or half a byte a weight plus an fp32 scale (and a one-byte
    zero point when asymmetric) a row and group (4-bit)."""
    int4 = parse_int4_method(method)
    if int4 is None:
        return rows * cols + rows * 4
    group, zero_point = int4
    groups = 1 if group == 0 else -(-cols // group)
    return rows * cols // 2 + rows * groups * (5 if zero_point else 4)


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower of a vision-language model (GLM-4.1V's `vision_config`) and the token ids
    that place its output in the prompt."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int  # of the merger's MLP (the blocks' MLP is out_hidden_size wide)
    out_hidden_size: int  # = the text model's hidden size
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    image_size: int = 336  # the learned position table covers (image_size / patch_size)^2
    in_channels: int = 3
    rms_norm_eps: float = 1e-5
    attention_bias: bool = False
    rope_theta: float = 10000.0
    image_token_id: int = 151343
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340

    @property
    def patch_dim(self) -> int:  # values per flattened patch: 3 x 2 x 14 x 14 = 1176
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def num_params(self) -> int:
        h, o, i = self.hidden_size, self.out_hidden_size, self.intermediate_size
        m = self.spatial_merge_size**2
        embed = self.patch_dim * h + h + h + (self.image_size // self.patch_size) ** 2 * h
        block = 2 * h + 3 * h * h + (3 * h if self.attention_bias else 0) + h * h + 3 * h * o
        merge = h + h * o * m + o + o * o + 2 * o + 3 * o * i
        return embed + self.depth * block + merge


@dataclass(frozen=True)
class EvaVisionConfig:
    """GLM-4V-9B's EVA2-CLIP tower (`vision_config` of a ChatGLMModel config) and its adapter.

    Fixed image_size^2 input in patches of patch_size, plus a CLS token (one learned position
    each); post-norm blocks; CLS dropped, a 2x2 stride-2 conv to the text width, a GLU, learned
    boi/eoi vectors around the patches, all divided by scaling_factor."""

    depth: int
    hidden_size: int
    num_heads: int
    intermediate_size: int  # the blocks' GELU MLP
    out_hidden_size: int  # = the text model's hidden size
    glu_intermediate_size: int  # the adapter's GLU (the text model's ffn_hidden_size)
    image_size: int = 1120
    patch_size: int = 14
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    scaling_factor: float = 8.0
    boi_token_id: int = 151339
    eoi_token_id: int = 151340
    # the prompt's one id between boi and eoi before the span is widened (<|endoftext|>, the
    # config's pad_token_id)
    placeholder_token_id: int = 151329

    @property
    def grid(self) -> int:  # patches per side
        return self.image_size // self.patch_size

    @property
    def num_patch_embeds(self) -> int:  # after the 2x2 conv: 1600 at 1120 / 14
        return (self.grid // 2) ** 2

    @property
    def num_image_tokens(self) -> int:  # the tower's rows per image: boi + patches + eoi
        return self.num_patch_embeds + 2

    @property
    def num_params(self) -> int:
        h, i, o, g = self.hidden_size, self.intermediate_size, self.out_hidden_size, \
            self.glu_intermediate_size
        embed = self.in_channels * self.patch_size**2 * h + h + h + (self.grid**2 + 1) * h
        block = 4 * h + 3 * h * h + 3 * h + h * h + h + h * i + i + i * h + h
        adapter = h * o * 4 + o + o * o + 2 * o + 3 * o * g + 2 * o
        return embed + self.depth * block + adapter

    def images_per_step(self, encoder_budget: int) -> int:
        """The most images one step encodes under an encoder budget (in embeddings, the
        scheduler's): one at least (the first image of a step is always allowed)."""
        return max(1, encoder_budget // self.num_image_tokens)

    def rank_quantized_counts(self, tp: int) -> tuple[int, int]:
        """(weights, output channels) of one rank's parallel linears (those a quantized model
        holds quantized): per block q|k|v, dense, fc1, fc2; the adapter's gate|up and down."""
        h, i, o, g = self.hidden_size, self.intermediate_size, self.out_hidden_size, \
            self.glu_intermediate_size
        weights = self.depth * (4 * h * h + 2 * h * i) // tp + 3 * o * g // tp
        channels = self.depth * (3 * h // tp + h + i // tp + h) + 2 * g // tp + o
        return weights, channels

    def rank_quantized_linears(self, tp: int) -> list[tuple[int, int, int]]:
        """(count, rows, cols) of one rank's parallel linears (those rank_quantized_counts
        counts)."""
        h, i, o, g = self.hidden_size, self.intermediate_size, self.out_hidden_size, \
            self.glu_intermediate_size
        d = self.depth
        return [(d, 3 * h // tp, h), (d, h, h // tp), (d, i // tp, h), (d, h, i // tp),
                (1, 2 * g // tp, o), (1, o, g // tp)]

    def rank_num_params(self, tp: int) -> int:
        """Parameters one tensor-parallel rank holds: the blocks' linears and the adapter's
        gated MLP are split, the rest replicated."""
        h, i, o, g = self.hidden_size, self.intermediate_size, self.out_hidden_size, \
            self.glu_intermediate_size
        split = self.depth * (3 * h * h + 3 * h + h * h + h * i + i + i * h) + 3 * o * g
        return self.num_params - split + split // tp


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model code needs, normalised across checkpoint layouts.

    `architecture` is the name our registry knows (e.g. "GlmForCausalLM"); remote-code ChatGLM
    checkpoints are normalised to the same fields (their weight names are mapped by the loader).
    """

    model: str  # checkpoint folder, or a preset name with load_format="dummy"
    architecture: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rotary_dim: int  # dims of each head that are rotated (GLM: head_dim // 2)
    rope_interleaved: bool  # True: GPT-J pairs (x0,x1),(x2,x3)..; False: NeoX halves
    max_model_len: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    rope_scaling: dict[str, Any] | None = None
    attention_bias: bool = False  # bias on q/k/v projections
    o_proj_bias: bool = False  # bias on attention's output projection (Llama/Qwen3)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k
    sandwich_norm: bool = False  # GLM-4-0414: post-attention and post-MLP norms
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    # sampling defaults from generation_config.json (temperature, top_p, top_k, ...)
    generation_defaults: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None  # folder holding tokenizer files; None: token ids only
    load_format: str = "auto"  # "auto" (safetensors) | "dummy" (random weights)
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)
    # M-RoPE (GLM-4.1V): the rotated pairs split into sections turned by the t, h, w positions
    mrope_section: tuple[int, ...] | None = None
    vision: VisionConfig | None = None  # vision-language models: the vision tower
    # ChatGLM-6B v1 layout: LayerNorm with bias, GELU MLP with biases, per-head interleaved fused
    # qkv, residual x * sqrt(2 * layers) + f(x), 2-D rotary (position id | block position id)
    position_encoding_2d: bool = False
    # prefix-LM attention: the prompt's tokens before <sop> (bos_token_id) see each other
    # bidirectionally; <sop> and everything after it attend causally
    prefix_lm: bool = False
    mask_token_ids: tuple[int, ...] = ()  # [gMASK], [MASK]: the first present marks the prompt
    eva_vision: EvaVisionConfig | None = None  # GLM-4V-9B: the EVA2-CLIP tower
    # the decoder's linears hold int8 / fp8 weights + per-channel scales, or 4-bit ones +
    # per-group scales ("w4a16-g128", "w4a16-channel-asym", ...) (None: cfg.dtype); the LM head
    # too with quantize_lm_head (not 4-bit); embeddings, norms and the vision tower stay in
    # cfg.dtype
    quantization: str | None = None
    quantize_lm_head: bool = False

    @property
    def num_params(self) -> int:
        """Parameter count computed from the shapes, without allocating anything."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        if self.position_encoding_2d:  # every linear and norm has a bias; the MLP is not gated
            layer = 4 * h * h + 4 * h + 2 * h * i + i + h + 4 * h
            return self.num_hidden_layers * layer + 2 * v * h + 2 * h
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if self.attention_bias else 0)
        attn += h if self.o_proj_bias else 0
        mlp = 3 * h * i
        norms = h * (4 if self.sandwich_norm else 2) + (2 * self.head_dim if self.qk_norm else 0)
        per_layer = attn + mlp + norms
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        vision = self.vision.num_params if self.vision is not None else 0
        vision += self.eva_vision.num_params if self.eva_vision is not None else 0
        return self.num_hidden_layers * per_layer + embed + h + vision

    @property
    def dtype_bytes(self) -> int:
        return {"float32": 4, "bfloat16": 2, "float16": 2}[self.dtype]

    def quantized_counts(self, tp: int = 1) -> tuple[int, int]:
        """(weights, output channels) of one rank's quantized linears: each weight takes one
        byte instead of dtype_bytes and each channel adds a 4-byte scale. (0, 0) unquantized."""
        if self.quantization is None:
            return 0, 0
        h, hd = self.hidden_size, self.head_dim
        q = self.num_attention_heads // tp * hd
        kv = max(1, self.num_key_value_heads // tp) * hd
        inter = self.intermediate_size // tp
        weights = h * (q + 2 * kv) + q * h + 2 * h * inter + inter * h
        channels = (q + 2 * kv) + h + 2 * inter + h
        weights, channels = self.num_hidden_layers * weights, self.num_hidden_layers * channels
        if self.eva_vision is not None:  # GLM-4V-9B: the tower's parallel linears too
            w, c = self.eva_vision.rank_quantized_counts(tp)
            weights, channels = weights + w, channels + c
        if self.quantize_lm_head:
            vocab = -(-self.vocab_size // tp)
            weights, channels = weights + vocab * h, channels + vocab
        return weights, channels

    def rank_quantized_linears(self, tp: int = 1) -> list[tuple[int, int, int]]:
        """(count, rows, cols) of one rank's quantized linears (those quantized_counts
        counts); [] unquantized."""
        if self.quantization is None:
            return []
        h, hd = self.hidden_size, self.head_dim
        q = self.num_attention_heads // tp * hd
        kv = max(1, self.num_key_value_heads // tp) * hd
        inter = self.intermediate_size // tp
        n = self.num_hidden_layers
        out = [(n, q + 2 * kv, h), (n, h, q), (n, 2 * inter, h), (n, h, inter)]
        if self.eva_vision is not None:
            out += self.eva_vision.rank_quantized_linears(tp)
        if self.quantize_lm_head:
            out.append((1, -(-self.vocab_size // tp), h))
        return out

    def quantized_weight_bytes(self, params: int, tp: int = 1) -> int:
        """Bytes of `params` parameters (one rank's at tensor-parallel size tp) with this
        config's quantized linears counted at their real size (quantized_linear_bytes)."""
        if self.quantization is None:
            return params * self.dtype_bytes
        weights, _ = self.quantized_counts(tp)
        stored = sum(count * quantized_linear_bytes(self.quantization, rows, cols)
                     for count, rows, cols in self.rank_quantized_linears(tp))
        return (params - weights) * self.dtype_bytes + stored

    @property
    def weight_bytes(self) -> int:
        return self.quantized_weight_bytes(self.num_params)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for one token over all layers, stored in the model's dtype."""
        return self.kv_cache_bytes_per_token("auto")

    def kv_cache_bytes_per_token(self, kv_cache_dtype: str) -> int:
        """K and V for one token over all layers in a cache of `kv_cache_dtype`."""
        elem = kv_cache_element_bytes(kv_cache_dtype, self.dtype)
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * elem


# --kv-cache-dtype: "auto" stores K/V in the model's dtype; "fp8" as float8_e4m3fn, each layer's
# K and V divided by a per-tensor scale (1.0 unless the checkpoint gives one)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")


def normalize_kv_cache_dtype(kv_cache_dtype: str) -> str:
    """"auto" or "fp8" ("fp8_e4m3" is vLLM's other name for the same format)."""
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv_cache_dtype: must be one of {', '.join(KV_CACHE_DTYPES)} (got {kv_cache_dtype!r})"
        )
    return "fp8" if kv_cache_dtype.startswith("fp8") else "auto"


def kv_cache_element_bytes(kv_cache_dtype: str, model_dtype: str) -> int:
    """Bytes of one cached K or V element."""
    if normalize_kv_cache_dtype(kv_cache_dtype) == "fp8":
        return 1
    return {"float32": 4, "bfloat16": 2, "float16": 2}[model_dtype]


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache (model runner, block manager)."""

    block_size: int
    enable_prefix_caching: bool
    # blocks per rank: fixed by the user, else None until the runner plans it from memory (the
    # engine core then holds the planned count)
    num_blocks: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_memory: int | None = None  # bytes for the KV cache (CPU default: 1 GiB)
    cache_dtype: str = "auto"  # "auto": the model's dtype | "fp8": float8_e4m3fn + scales

    @property
    def planned_num_blocks(self) -> int:
        """`num_blocks` of a planned cache (the engine core's config, and the one it reports)."""
        if self.num_blocks is None:
            raise RuntimeError("the KV cache's number of blocks is not planned yet")
        return self.num_blocks


@dataclass(frozen=True)
class SchedulerConfig:
    """The batch limits (scheduler; the runner sizes its CUDA graphs and profiling by them)."""

    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    disable_custom_all_reduce: bool = False  # NCCL instead of the fused all-reduce kernel


@dataclass(frozen=True)
class RunnerConfig:
    """How a rank runs: its device, seed, CUDA graphs and the peaks for MBU/MFU."""

    device: str = "auto"
    seed: int = 0
    enforce_eager: bool = False
    peak_memory_bandwidth: float | None = None
    peak_flops: float | None = None


@dataclass(frozen=True)
class EngineConfig:
    """Every component's config, resolved once (by rank 0; pickled to the other ranks)."""

    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    parallel: ParallelConfig
    runner: RunnerConfig


@dataclass(frozen=True)
class EngineArgs:
    """User-facing engine arguments; names follow vLLM's where the meaning is the same."""

    model: str | None = None  # None: the built-in demo model
    tokenizer: str | None = None
    dtype: str = "auto"  # auto: bf16 on GPU (fp16 where bf16 is missing), fp32 on CPU
    device: str = "auto"  # auto | cuda | cpu
    seed: int = 0
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    enable_prefix_caching: bool = True
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # fix the KV cache size in blocks
    kv_cache_memory: int | None = None  # bytes for the KV cache (CPU default: 1 GiB)
    kv_cache_dtype: str = "auto"  # auto (the model's dtype) | fp8 (float8_e4m3fn, scaled)
    load_format: str = "auto"  # auto | safetensors | dummy
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    # tensor parallel on one node: NCCL instead of the fused all-reduce + add + RMSNorm kernel
    disable_custom_all_reduce: bool = False
    # the device's peaks for MBU/MFU (bytes/s of a copy, FLOP/s of a matmul); None: measured
    peak_memory_bandwidth: float | None = None
    peak_flops: float | None = None
    # weight quantization: None (the checkpoint's own, else the model dtype), int8, fp8 or w4a16
    quantization: str | None = None
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}: {why} (got {getattr(self, name)!r})")

        if self.dtype not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16"):
            raise bad("dtype", "must be auto, float32, bfloat16 or float16")
        if self.device not in ("auto", "cuda", "cpu"):
            raise bad("device", "must be auto, cuda or cpu")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size",
                     "tensor_parallel_size"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise bad("max_model_len", "must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise bad("num_kv_blocks", "must be >= 1")
        if self.kv_cache_memory is not None and self.kv_cache_memory < 1:
            raise bad("kv_cache_memory", "must be > 0 bytes")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise bad("gpu_memory_utilization", "must be in (0, 1]")
        for name in ("peak_memory_bandwidth", "peak_flops"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise bad(name, "must be > 0")
        if self.load_format not in ("auto", "safetensors", "dummy"):
            raise bad("load_format", "must be auto, safetensors or dummy")
        normalize_kv_cache_dtype(self.kv_cache_dtype)  # raises naming the field
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS \
                and not self.quantization.startswith("w4a16-"):  # w4a16-g64-asym, ...
            raise bad("quantization", f"must be one of {', '.join(QUANTIZATION_METHODS)}")

    def resolve(self, model: ModelConfig) -> EngineConfig:
        """The components' configs, given the model's (resolved from the checkpoint)."""
        return EngineConfig(
            model=model,
            cache=CacheConfig(
                block_size=self.block_size,
                enable_prefix_caching=self.enable_prefix_caching,
                num_blocks=self.num_kv_blocks,
                gpu_memory_utilization=self.gpu_memory_utilization,
                kv_cache_memory=self.kv_cache_memory,
                cache_dtype=normalize_kv_cache_dtype(self.kv_cache_dtype),
            ),
            scheduler=SchedulerConfig(
                max_num_seqs=self.max_num_seqs,
                max_num_batched_tokens=self.max_num_batched_tokens,
                max_model_len=model.max_model_len,
            ),
            parallel=ParallelConfig(self.tensor_parallel_size, self.disable_custom_all_reduce),
            runner=RunnerConfig(self.device, self.seed, self.enforce_eager,
                                self.peak_memory_bandwidth, self.peak_flops),
        )

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


# -- the engine flags on the command line (flatout generate / serve, the TP worker) ------------
_HELP = {
    "model": "checkpoint folder, or a preset name with --load-format dummy (default: demo model)",
    "dtype": "auto, float32, bfloat16 or float16 (auto: bf16 on GPU, fp32 on CPU)",
    "kv_cache_memory": "bytes for the KV cache (CPU default 1 GiB; GPU: sized from free memory)",
    "num_kv_blocks": "fix the KV cache size in blocks",
    "kv_cache_dtype": "auto (K/V in the model's dtype) or fp8 (float8 e4m3 with per-layer K and V "
                      "scales, 1.0 unless the checkpoint has k_scale/v_scale: twice the tokens, "
                      "half the KV bytes per decode step; GPUs of compute capability 8.9+)",
    "load_format": "auto (safetensors) or dummy (random weights, real shapes)",
    "peak_memory_bandwidth": "device copy bandwidth in bytes/s for MBU (default: measured)",
    "peak_flops": "device matmul FLOP/s in the model's dtype for MFU (default: measured)",
    "quantization": "weight quantization, quantized on load from a bf16/fp16 checkpoint (or "
                    "the checkpoint's own quantization_config): int8 = int8 weights, 16-bit "
                    "activations (W8A16), any GPU; fp8 = e4m3 weights and per-token e4m3 "
                    "activations (W8A8), compute capability >= 8.9 (Ada, Hopper); both with one "
                    "scale per output channel; w4a16 = 4-bit weights, 16-bit activations "
                    "(W4A16), any GPU, one scale per group of 128 inputs (round to nearest: "
                    "prefer a GPTQ / AWQ / compressed-tensors pack-quantized checkpoint, served "
                    "as it ships with its groups and zero points). Unset: the checkpoint's own. "
                    "Embeddings and the LM head stay in --dtype",
    "quantize_lm_head": "with --quantization: quantize the LM head too (half its bytes, a "
                        "little more logit error; not with tied embeddings)",
    "disable_custom_all_reduce": "tensor parallel: all-reduce over NCCL only, not the fused "
                                 "one-shot all-reduce + add + RMSNorm kernel over NVLink",
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "kv_cache_dtype": KV_CACHE_DTYPES, "quantization": QUANTIZATION_METHODS,
}


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineArgs field, named as vLLM's (--max-num-seqs, ...)."""
    hints = typing.get_type_hints(EngineArgs)
    for f in dataclasses.fields(EngineArgs):
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=f.default,
                help=_HELP.get(f.name),
            )
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=_HELP.get(f.name),
                                choices=_CHOICES.get(f.name))


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    return EngineArgs(**{name: getattr(ns, name) for name in EngineArgs.field_names()})
