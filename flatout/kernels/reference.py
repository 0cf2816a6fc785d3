"""One pure-PyTorch implementation of every op flatout's layers run: the CPU path (chosen by
flatout.kernels.ops) and the oracle the Triton kernels are tested against.

Each function has the signature and rounding of the Triton kernel of the same name (norm.py,
rotary.py, activation.py, kv_cache.py, prefill_attention.py, decode_attention.py, allreduce.py,
top_k_top_p.py), so the two are interchangeable. This module does not import triton. The
attention functions read their tensors' values on the host (sequence lengths, chunk
boundaries), so on a GPU they sync and cannot be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / sqrt(mean(x^2) + eps) over the last dim, normalised in fp32 and rounded to x's
    dtype before the product with the weight (as transformers rounds), then again after it."""
    xf = x.float()
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * y).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the sum, in x's dtype, is the next residual."""
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def one_shot_add_rms_norm(
    partials: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused all-reduce + add + RMSNorm from the ranks' partials: summed in rank order in
    fp32 and rounded to the residual's dtype, as the kernel sums them."""
    total = partials[0].float()
    for p in partials[1:]:
        total = total + p.float()
    return fused_add_rms_norm(total.to(residual.dtype), residual, weight, eps)


def rotary_embedding(
    positions: torch.Tensor,  # [T] int
    q: torch.Tensor,  # [T, H*D], rows may be strided (a view into qkv)
    k: torch.Tensor,  # [T, KVH*D]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim]: cos | sin
    head_dim: int,
    interleaved: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates the first rotary_dim dims of each head of q and k in place and returns them.

    interleaved (GPT-J; GLM, ChatGLM): pair i = dims (2i, 2i+1); otherwise (NeoX; Llama, Qwen)
    pair i = dims (i, i + R/2). Math in fp32, rounded once to the input dtype."""
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache.index_select(0, positions.long()).float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, R/2]: broadcast over heads
    for x in (q, k):
        heads = x.view(x.shape[0], -1, head_dim)[..., :rotary_dim]  # [T, H, R] view
        rot = heads.float()
        if interleaved:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        else:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        heads.copy_(out)
    return q, k


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # x: [T, 2I] -> [T, I]
    """silu(x[:, :I]) * x[:, I:], computed in fp32, returned in x's dtype."""
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


# --kv-cache-dtype fp8: K/V stored as float8_e4m3fn, x / scale rounded to nearest even and
# saturated at the format's largest finite value (e4m3fn has no infinity)
FP8_KV_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_kv(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """x / scale (fp32) as float8_e4m3fn, saturated at +-448; scale None means 1."""
    xf = x.float() if scale is None else x.float() / scale.float()
    return xf.clamp(-FP8_MAX, FP8_MAX).to(FP8_KV_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """Cached K or V as fp32 values: fp8 times its scale; any other dtype unchanged."""
    if x.dtype != FP8_KV_DTYPE:
        return x
    return x.float() if scale is None else x.float() * scale.float()


def write_kv_cache(
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T]; -1 = padding, not stored
    k_scale: torch.Tensor | None = None,  # [] fp32: an fp8 cache holds k / k_scale
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store each new token's K/V at its slot (block slot // block_size, offset
    slot % block_size), in place; an fp8 cache stores them quantized (`quantize_kv`)."""
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    slots = slot_mapping.long()
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        flat = cache.view(-1, *cache.shape[2:])
        if cache.dtype == FP8_KV_DTYPE:  # index_copy_ has no fp8 kernel: copy the bytes
            flat.view(torch.uint8).index_copy_(0, slots, quantize_kv(x, scale).view(torch.uint8))
        else:
            flat.index_copy_(0, slots, x.to(cache.dtype))


def causal_attention(
    q: torch.Tensor,  # [N, H, D]: the queries at the last N positions of the context
    k: torch.Tensor,  # [S, KVH, D]: the whole context
    v: torch.Tensor,
    scale: float,
    prefix_len: int = 0,
) -> torch.Tensor:  # [N, H, D]
    """Attention of one sequence's last N positions over its context, causally, in fp32.

    The first `prefix_len` context tokens are visible to every query (prefix-LM: ChatGLM-6B's
    prompt attends to itself bidirectionally)."""
    n, num_heads, _ = q.shape
    s, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    qh = q.transpose(0, 1).float()  # [H, N, D]
    kh = k.transpose(0, 1).float().repeat_interleave(group, dim=0)  # [H, S, D]
    vh = v.transpose(0, 1).float().repeat_interleave(group, dim=0)
    q_pos = torch.arange(s - n, s, device=q.device)[:, None]
    k_pos = torch.arange(s, device=q.device)[None, :]
    mask = (k_pos <= q_pos) | (k_pos < prefix_len)  # [N, S]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale)
    return o.transpose(0, 1).to(q.dtype)


def varlen_causal_attention(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, KVH, D]
    v: torch.Tensor,
    query_start_loc: list[int],  # [B+1] boundaries of the sequences in the batch
    scale: float,
    prefix_lens: list[int] | None = None,  # [B] bidirectional prefix of each sequence
) -> torch.Tensor:  # [T, H, D]
    """Each sequence of a flattened batch attends causally to its own tokens only (no cache),
    and to all of its first prefix_lens[i] tokens."""
    out = torch.empty_like(q)
    for i in range(len(query_start_loc) - 1):
        s, e = query_start_loc[i], query_start_loc[i + 1]
        prefix = prefix_lens[i] if prefix_lens is not None else 0
        out[s:e] = causal_attention(q[s:e], k[s:e], v[s:e], scale, prefix)
    return out


def _context(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:  # [S, KVH, D]
    """One sequence's first `seq_len` cached tokens, gathered through its block table (an fp8
    cache's dequantized to fp32)."""
    num_blocks = -(-seq_len // cache.shape[1])
    gathered = cache[block_table[:num_blocks].long()].flatten(0, 1)[:seq_len]
    return dequantize_kv(gathered, scale)


def paged_prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    query_start_loc: torch.Tensor,  # [B+1]
    seq_lens: torch.Tensor,  # [B], context length including the chunk
    block_tables: torch.Tensor,  # [B, max_blocks]
    scale: float,
    max_query_len: int,  # accepted for the kernel's signature
    k_scale: torch.Tensor | None = None,  # [] fp32, of an fp8 cache (None: 1)
    v_scale: torch.Tensor | None = None,
    prefix_lens: torch.Tensor | None = None,  # [B]: context tokens every query sees
) -> torch.Tensor:  # [T, H, D]
    """Causal attention of each sequence's new chunk over its whole paged context: query j of a
    chunk of n sits at position seq_len - n + j. With prefix_lens, the first prefix_lens[i]
    tokens of sequence i are visible to all its queries (prefix-LM). Tokens past
    query_start_loc[-1] come out 0."""
    out = torch.zeros_like(q)
    starts = query_start_loc.tolist()
    prefixes = prefix_lens.tolist() if prefix_lens is not None else [0] * len(seq_lens)
    for i, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[i], starts[i + 1]
        if end == start:
            continue
        k = _context(k_cache, block_tables[i], seq_len, k_scale)
        v = _context(v_cache, block_tables[i], seq_len, v_scale)
        out[start:end] = causal_attention(q[start:end], k, v, scale, prefixes[i])
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    seq_lens: torch.Tensor,  # [B], context length including the new token
    scale: float,
    k_scale: torch.Tensor | None = None,  # [] fp32, of an fp8 cache (None: 1)
    v_scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,  # [B, H, D]
) -> torch.Tensor:  # [B, H, D]
    """Attention of each sequence's one new query over its whole cached context; rows with
    seq_len 0 (batch padding) come out 0."""
    if out is None:
        out = torch.empty_like(q)
    for i, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            out[i] = 0
            continue
        k = _context(k_cache, block_tables[i], seq_len, k_scale)
        v = _context(v_cache, block_tables[i], seq_len, v_scale)
        out[i : i + 1] = causal_attention(q[i : i + 1], k, v, scale)
    return out


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x @ weight.T + bias (the oracle of flatout.kernels.gemv)."""
    return F.linear(x, weight, bias)


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel INT8: weight [N, K] -> (int8 [N, K], fp32 scale [N]) with
    weight ~= q * scale[:, None]; an all-zero row gets scale 1."""
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def linear_w8a16(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """(x @ qweight.T) * scale + bias in fp32, returned in x's dtype (oracle of the int8 GEMV)."""
    y = F.linear(x.float(), qweight.float()) * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# 4-bit weights (W4A16), flatout's layout: q in 0..15 packed two per uint8 byte along K (byte j
# of a row holds k = 2j in its low nibble and k = 2j + 1 in its high one), scales [N, G] fp32 and
# optional zero points [N, G] uint8 (0..15; none: 8) for G groups of K // G consecutive inputs:
# w[n, k] = (q[n, k] - zero[n, k // group]) * scale[n, k // group]. Per channel is G = 1.
INT4_ZERO = 8  # the implicit zero point of symmetric 4-bit weights


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 values 0..15 [N, K] (K even) -> packed uint8 [N, K // 2]."""
    if q.shape[-1] % 2:
        raise ValueError(f"4-bit weights need an even number of inputs, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """packed uint8 [N, K // 2] -> uint8 values 0..15 [N, K]."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)


def int4_group_size(k: int, groups: int) -> int:
    """The inputs per group of a K-wide row with `groups` scales (K itself per channel)."""
    if groups < 1 or k % groups:
        raise ValueError(f"{groups} scale groups do not divide {k} inputs")
    return k // groups


def dequantize_w4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight a 4-bit layout encodes, in `dtype` ((q - zero) is exact in every float
    dtype; the product with the fp32 scale is rounded once to `dtype`)."""
    q = unpack_int4(packed)
    group = int4_group_size(q.shape[1], scale.shape[1])
    z = zero.float() if zero is not None else torch.full_like(scale, INT4_ZERO, dtype=torch.float32)
    w = (q.float() - z.repeat_interleave(group, 1)) * scale.float().repeat_interleave(group, 1)
    return w.to(dtype)


def quantize_w4(weight: torch.Tensor, group_size: int, zero_point: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest 4-bit weights per group of `group_size` inputs (0: per channel):
    weight [N, K] -> (q uint8 0..15 [N, K], fp32 scale [N, G], uint8 zero [N, G] or None).
    Symmetric: q = round(w / s) + 8 in 1..15 with s = amax / 7; asymmetric: s = (max - min) / 15,
    zero = round(-min / s), both ranges including 0. An all-zero group gets scale 1."""
    n, k = weight.shape
    group = k if group_size == 0 else group_size
    if k % group:
        raise ValueError(f"{k} inputs are not a multiple of the group size {group}")
    w = weight.float().reshape(n, k // group, group)
    if zero_point:
        lo = w.amin(dim=2).clamp(max=0.0)
        hi = w.amax(dim=2).clamp(min=0.0)
        scale = torch.where(hi > lo, (hi - lo) / 15.0, torch.ones_like(hi))
        zero = torch.round(-lo / scale).clamp_(0, 15)
        q = torch.round(w / scale[..., None]) + zero[..., None]
        return (q.clamp_(0, 15).to(torch.uint8).reshape(n, k), scale,
                zero.to(torch.uint8))
    amax = w.abs().amax(dim=2)
    scale = torch.where(amax > 0, amax / 7.0, torch.ones_like(amax))
    q = torch.round(w / scale[..., None]).clamp_(-7, 7) + INT4_ZERO
    return q.to(torch.uint8).reshape(n, k), scale, None


def linear_w4a16(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # x: [..., K], qweight: packed uint8 [N, K // 2], scale/zero: [N, G]
    """x @ dequantize_w4(...).T + bias in fp32, returned in x's dtype (oracle of the W4A16
    kernels, flatout.kernels.w4a16)."""
    y = F.linear(x.float(), dequantize_w4(qweight, scale, zero))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


FP8_MAX = 448.0  # largest finite float8_e4m3fn


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel FP8 e4m3: weight [N, K] -> (float8_e4m3fn [N, K], fp32
    scale [N]) with weight ~= q * scale[:, None]; an all-zero row gets scale 1."""
    w = weight.float()
    amax = w.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (w / scale[:, None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row FP8 e4m3 activations: x [M, K] -> (float8_e4m3fn [M, K], fp32 [M, 1]),
    x ~= q * scale; an all-zero row gets a tiny positive scale (its q is 0)."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-12) / FP8_MAX
    return (xf / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def linear_w8a8_fp8(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """W8A8 FP8: x quantized per row to e4m3, then (xq @ qweight.T) * x_scale * scale + bias
    in fp32, returned in x's dtype (oracle of flatout.kernels.fp8_linear)."""
    xq, x_scale = quantize_fp8_per_token(x.reshape(-1, x.shape[-1]))
    y = F.linear(xq.float(), qweight.float()) * x_scale * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], qweight.shape[0])


def top_k_threshold(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Each row's k-th largest logit, [B, 1]; -inf on rows whose top_k is V (no top-k).
    logits: [B, V]; top_k: [B] int64 in [1, V]; max_top_k: the largest k below V of any row."""
    V = logits.shape[1]
    top = logits.topk(max(1, min(max_top_k, V)), dim=1).values  # [B, K], descending
    kth = top.gather(1, (top_k.clamp(max=top.shape[1]) - 1).unsqueeze(1))  # [B, 1]
    return kth.masked_fill((top_k >= V).unsqueeze(1), float("-inf"))


def top_p_threshold(
    desc: torch.Tensor, top_p: torch.Tensor, extra_mass: torch.Tensor | None = None
) -> torch.Tensor:
    """The smallest logit top-p keeps, [B, 1] (-inf where top_p is 1: the row keeps all).

    desc: [B, N] a row's candidate logits sorted descending, -inf for tokens already dropped;
    top_p: [B] float32 in (0, 1]; extra_mass: [B, 1] weight, in units of exp(x - desc[:, 0]), of
    tokens outside desc that count in the normalising sum but lie below every threshold that
    matters (None: nothing outside). A token is kept when the probability of the candidates with
    a strictly larger logit is below top_p: tied tokens share the mass above the first of them,
    so they are kept or dropped together, and the most likely token always stays."""
    neg_inf = float("-inf")
    B, N = desc.shape
    weights = torch.where(desc > neg_inf, (desc - desc[:, :1]).exp(), 0.0)  # [B, N]
    total = weights.sum(dim=1, keepdim=True)  # [B, 1]
    if extra_mass is not None:
        total = total + extra_mass
    cum = (weights / total).cumsum(dim=1)  # [B, N]
    above = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=1)  # exclusive
    starts = torch.ones_like(desc, dtype=torch.bool)  # [B, N]: first of a run of equal logits
    starts[:, 1:] = desc[:, 1:] != desc[:, :-1]
    index = torch.arange(N, device=desc.device).expand(B, N)
    first = torch.where(starts, index, 0).cummax(dim=1).values  # [B, N] its run's first index
    above = above.gather(1, first)  # non-decreasing, 0 at the top
    kept = (above < top_p.unsqueeze(1)).sum(dim=1, keepdim=True)  # [B, 1], >= 1
    cut = desc.gather(1, kept - 1)
    return cut.masked_fill((top_p >= 1.0).unsqueeze(1), neg_inf)


def top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    max_top_k: int,
    top_k_every_row: bool,
) -> torch.Tensor:
    """Top-k then top-p truncation by sorting (the oracle of flatout.kernels.top_k_top_p).

    logits: [B, V] float32, updated in place (and returned). top_k: [B] int64 in [1, V], V on
    rows without top-k (None: no row has one); max_top_k: the largest such k below V;
    top_k_every_row: no row has top_k = V (the kernel uses it to pick a path; the answer is the
    same). top_p: [B] float32 in (0, 1] (None: no row has one). A row keeps the logits at least
    its k-th largest (ties with the k-th are kept), then top_p_threshold's set among them over
    their renormalised softmax; the others become -inf. Rows with every logit -inf stay so."""
    del top_k_every_row  # the same answer either way
    neg_inf = float("-inf")
    if top_k is not None:
        logits.masked_fill_(logits < top_k_threshold(logits, top_k, max_top_k), neg_inf)
    if top_p is not None:
        desc = logits.sort(dim=1, descending=True).values  # [B, V]
        logits.masked_fill_(logits < top_p_threshold(desc, top_p), neg_inf)
    return logits
