"""Triton kernels for the GPU fast path, each beside a pure-PyTorch reference of the same
signature (`<name>_ref`). Importing this package needs triton; on CPU the kernels run only under
the interpreter (TRITON_INTERPRET=1 set before import), which the tests use."""

from flatout.kernels.activation import silu_and_mul, silu_and_mul_ref
from flatout.kernels.allreduce import one_shot_add_rms_norm, one_shot_add_rms_norm_ref
from flatout.kernels.decode_attention import (
    decode_num_splits,
    paged_decode_attention,
    paged_decode_attention_ref,
)
from flatout.kernels.kv_cache import write_kv_cache, write_kv_cache_ref
from flatout.kernels.norm import (
    fused_add_rms_norm,
    fused_add_rms_norm_ref,
    rms_norm,
    rms_norm_ref,
)
from flatout.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from flatout.kernels.rotary import rotary_embedding, rotary_embedding_ref

__all__ = [
    "decode_num_splits",
    "fused_add_rms_norm",
    "fused_add_rms_norm_ref",
    "one_shot_add_rms_norm",
    "one_shot_add_rms_norm_ref",
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "rms_norm",
    "rms_norm_ref",
    "rotary_embedding",
    "rotary_embedding_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
    "write_kv_cache",
    "write_kv_cache_ref",
]
