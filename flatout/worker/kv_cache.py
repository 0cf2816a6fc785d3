"""The paged KV cache of one rank: how many blocks fit, allocating them, and what the GPU's
memory went to.

On a GPU the cache takes what is left of `gpu_memory_utilization` x the card after the weights,
the peak of a profiled forward over the largest batch the scheduler can form (including the
sampler's widest path, and for a vision model the tower over the largest image allowed), and
the memory outside torch's allocator (CUDA context, NCCL). On the CPU it takes
`kv_cache_memory` (1 GiB by default); `num_kv_blocks` fixes it anywhere.

`--kv-cache-dtype fp8` stores K and V as float8_e4m3fn (one byte per value, so twice the blocks
in the same memory); `auto` stores them in the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from flatout.config import CacheConfig, ModelConfig, SchedulerConfig
from flatout.layers.attention import Attention, AttentionMetadata, forward_context
from flatout.multimodal.image_size import MAX_PIXELS

if TYPE_CHECKING:
    from typing import TypeAlias

    from flatout.models.chatglm_v1 import ChatGLMv1ForCausalLM
    from flatout.models.decoder import CausalLM
    from flatout.models.glm4v import Glm4vForConditionalGeneration
    from flatout.models.glm4v_9b import ChatGLM4VForCausalLM

    Model: TypeAlias = (CausalLM | Glm4vForConditionalGeneration | ChatGLMv1ForCausalLM
                        | ChatGLM4VForCausalLM)

CPU_DEFAULT_KV_CACHE_MEMORY = 1 << 30
# the Triton kernels convert float8_e4m3fn in registers: NVIDIA GPUs from Ada/Hopper (sm_89) on
FP8_MIN_CAPABILITY = (8, 9)


def kv_cache_dtype(cache: CacheConfig, model_dtype: torch.dtype,
                   device: torch.device) -> torch.dtype:
    """The torch dtype of the KV cache; raises ValueError (at startup, before anything is loaded)
    for an fp8 cache on a GPU that cannot convert float8_e4m3fn."""
    if cache.cache_dtype == "auto":
        return model_dtype
    if cache.cache_dtype != "fp8":
        raise ValueError(f"kv_cache_dtype: unknown cache dtype {cache.cache_dtype!r}")
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            name = torch.cuda.get_device_name(device)
            raise ValueError(
                f"kv_cache_dtype fp8: {name} (compute capability {capability[0]}.{capability[1]})"
                f" cannot convert float8_e4m3fn in its attention kernels, which needs compute "
                f"capability 8.9 or later (Ada, Hopper, Blackwell); use --kv-cache-dtype auto"
            )
    return torch.float8_e4m3fn


@dataclass
class MemoryUse:
    """What this rank's GPU memory went to (bytes), as `flatout plan` predicts it."""

    weights: int = 0  # allocated by the model's parameters
    activations: int = 0  # profiled peak of the largest batch, beyond the weights
    runtime: int = 0  # outside torch's allocator: CUDA context, NCCL, cuBLAS workspaces
    kv_cache: int = 0
    kv_tokens: int = 0
    cuda_graphs: int = 0  # reserved by graph capture (after the KV cache was sized)

    def describe(self) -> str:
        gib = 1 << 30
        return (f"weights {self.weights / gib:.2f} GiB, activations {self.activations / gib:.2f}"
                f" GiB, runtime {self.runtime / gib:.2f} GiB, KV cache {self.kv_cache / gib:.2f}"
                f" GiB ({self.kv_tokens} tokens), CUDA graphs {self.cuda_graphs / gib:.2f} GiB")


def kv_block_bytes(attn_layers: list[Attention], block_size: int, dtype: torch.dtype) -> int:
    """K and V bytes of one block on this rank (its own share of the KV heads)."""
    elem = torch.empty((), dtype=dtype).element_size()
    per_token = sum(2 * a.num_kv_heads * a.head_dim for a in attn_layers) * elem
    return per_token * block_size


def plan_num_blocks(model: Model, attn_layers: list[Attention], cache: CacheConfig,
                    sched: SchedulerConfig, device: torch.device, dtype: torch.dtype,
                    memory: MemoryUse) -> int:
    """Blocks this rank can hold; on a GPU records the activation peak and runtime memory."""
    block_bytes = kv_block_bytes(attn_layers, cache.block_size, dtype)
    if cache.num_blocks is not None:
        return cache.num_blocks
    if device.type != "cuda":
        budget = cache.kv_cache_memory or CPU_DEFAULT_KV_CACHE_MEMORY
        return max(1, budget // block_bytes)
    if cache.kv_cache_memory is not None:
        return max(1, cache.kv_cache_memory // block_bytes)
    peak = profile_peak_memory(model, sched.max_num_batched_tokens, sched.max_num_seqs, device)
    free, total = torch.cuda.mem_get_info(device)
    not_torch = (total - free) - torch.cuda.memory_reserved(device)
    memory.activations = peak - memory.weights
    memory.runtime = not_torch
    budget = int(total * cache.gpu_memory_utilization) - peak - not_torch
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise RuntimeError(
            f"no GPU memory left for the KV cache: weights and activations take "
            f"{peak / 2**30:.2f} GiB of {total * cache.gpu_memory_utilization / 2**30:.2f} GiB "
            f"(gpu_memory_utilization={cache.gpu_memory_utilization}); raise it or lower "
            f"max_num_batched_tokens"
        )
    return num_blocks


def largest_image_grid(config: ModelConfig) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of the largest (square) image the default max_pixels admits,
    whose vision-tower activations the profile reserves."""
    vc = config.vision
    assert vc is not None
    m = vc.spatial_merge_size
    patches = MAX_PIXELS // (vc.temporal_patch_size * vc.patch_size**2)
    side = max(m, int(patches**0.5) // m * m)
    return 1, side, side


@torch.inference_mode()
def profile_peak_memory(model: Model, num_tokens: int, num_seqs: int,
                        device: torch.device) -> int:
    """Peak bytes of a forward over the largest batch the scheduler can form, and of sampling
    its rows (every rank runs it: the forward's collectives pair up)."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    num_seqs = max(1, min(num_seqs, num_tokens))
    lens = [num_tokens // num_seqs] * num_seqs
    lens[-1] += num_tokens - sum(lens)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lens])
    dims = getattr(model, "position_dims", 1)
    if dims > 1:  # [T, dims]: the same position on every axis
        pos = pos[:, None].expand(-1, dims).contiguous()
    with forward_context(AttentionMetadata.for_prefill_without_cache(lens, device)):
        hidden = model(ids, pos)
    ends = torch.tensor(lens, device=device).cumsum(0) - 1
    logits = model.compute_logits(hidden[ends]).float()
    # the sampler's widest path: probabilities and a full sort for top-p
    probs = torch.softmax(logits, dim=-1)
    probs.sort(dim=-1, descending=True)
    del hidden, logits, probs
    eva = model.config.eva_vision
    if eva is not None:  # GLM-4V-9B: the tower over the most images one step encodes
        from flatout.models.glm4v_9b import ChatGLM4VForCausalLM

        assert isinstance(model, ChatGLM4VForCausalLM)
        s = eva.image_size
        images = torch.zeros(eva.images_per_step(num_tokens), eva.in_channels, s, s,
                             device=device)
        model.encode_images(images)
        del images
    vision = model.config.vision
    if vision is not None:  # a vision model: the tower over the largest image allowed
        from flatout.models.glm4v import Glm4vForConditionalGeneration

        assert isinstance(model, Glm4vForConditionalGeneration)
        grid = largest_image_grid(model.config)
        pixel_values = torch.zeros(grid[1] * grid[2], vision.patch_dim, device=device)
        model.encode_images(pixel_values, [grid])
        del pixel_values
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    return peak


def allocate_kv_cache(attn_layers: list[Attention], num_blocks: int, block_size: int,
                      dtype: torch.dtype, device: torch.device) -> None:
    """Give every attention layer its K and V cache: [num_blocks, block_size, KVH, D] each, of
    `dtype` (`kv_cache_dtype`: the model's, or float8_e4m3fn)."""
    # zeroed on the GPU (kernels mask unused slots but must never meet NaN garbage); left
    # uninitialised on the CPU so that untouched blocks never take resident memory
    alloc = torch.zeros if device.type == "cuda" else torch.empty
    for layer in attn_layers:
        shape = (num_blocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.k_cache = alloc(shape, dtype=dtype, device=device)
        layer.v_cache = alloc(shape, dtype=dtype, device=device)
