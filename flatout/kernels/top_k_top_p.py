"""Top-k and top-p truncation without a full-vocabulary sort.

Semantics: those of flatout.kernels.reference.top_k_top_p, which sorts. A row keeps the tokens
whose logit is at least its k-th largest (ties with the k-th are kept), then, over the survivors'
renormalised softmax, the tokens whose strictly larger survivors hold less than top_p of the
probability; the rest become -inf. Both rules compare values, so tied tokens are kept or dropped
together and the kept set does not depend on any order among equal logits.

Two paths, chosen on the host from what the batch asks (no device-to-host copy):

* every row has a top-k of at most MAX_CANDIDATES (the common "top_k=50, top_p=0.9"): torch.topk
  gives each row's candidates already sorted, and top-p runs over those few (the reference's own
  `top_p_threshold`). Tokens tied with the k-th logit beyond the candidates take part only
  through the normalising mass: one full-row count finds how many there are.
* otherwise (a row with top-p but no top-k, or a large k): a radix select of the top-p threshold
  in Triton. Logits map to order-preserving 32-bit keys; eight passes each fix four more bits of
  the threshold key from a 16-bin histogram of probability mass among the survivors that share
  the bits fixed so far. The threshold is the smallest key q whose strictly larger survivors
  hold less than top_p of the mass: in each pass the lowest bin whose higher bins (plus the mass
  above the prefix) stay under top_p contains it. A last pass writes -inf below the threshold
  (and below the top-k cut, which torch.topk finds first). Each pass reads the row once (the
  first also finds the row's max, rescaling its sums as the max grows) and keeps only 16 sums;
  no candidate list, no sort, the same nine reads whatever the distribution (a flat row costs
  what a peaked one does, less the bins' arithmetic on tiles without a token in the prefix).
  The kept set is exact: the threshold is found to the last bit, and ties share one key (-0.0
  and +0.0 too).

Why not bisection on values or a sort of a pre-filtered tail: either needs a data-dependent
number of passes or a variable-size buffer (a host sync to size it), and neither bounds the worst
case. Why not top-k first for every row: a row without top-k has no bound on its nucleus.

The radix passes spread a row over several programs (chunks) when the batch is small, so that
batch 1 uses the whole GPU; then each pass is its own launch and the programs of a row meet
through their partial histograms, which the next launch sums in one fixed order (every program
of the row computes the same decision). With many rows, one program per row runs every pass in
one launch, carrying the histogram in registers.

Float rounding: the masses are fp32 sums in another order than the reference's cumulative sum,
so a token whose mass above lies within rounding of top_p may fall on the other side; anywhere
else the kept sets are identical.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flatout.kernels import reference
from flatout.kernels._utils import INTERPRET, next_pow2, num_sms

# every row's top-k at most this: top-p over torch.topk's candidates instead of the radix passes
MAX_CANDIDATES = 1024
DIGIT_BITS = 4
NUM_BINS = 1 << DIGIT_BITS
NUM_PASSES = 32 // DIGIT_BITS
BLOCK = 256 if INTERPRET else 1024


@triton.jit
def _order_key(x):
    """fp32 -> uint32 with the same order (-0.0 and +0.0 share a key; -inf is below all finite)."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = tl.full(bits.shape, 0x80000000, tl.uint32)
    ones = tl.full(bits.shape, 0xFFFFFFFF, tl.uint32)  # xor, not ~: the interpreter's ~ fails
    key = tl.where((bits & sign) != 0, bits ^ ones, bits | sign)
    return tl.where(x == 0.0, sign, key)


# sizes are not specialised on (== 1, multiples of 16): the ten variants (FIRST, LAST) compile
# once whatever the batch and vocabulary (Sampler.warm_up compiles them at startup)
@triton.jit(do_not_specialize=["stride_row", "B", "V", "S", "CHUNK"])
def _top_p_kernel(
    logits_ptr, stride_row, kth_ptr, top_p_ptr,
    part_ptr,  # [NUM_PASSES, B, S, NUM_BINS] fp32: each chunk's mass per bin, per pass
    cmax_ptr,  # [B, S] fp32: each chunk's largest survivor (pass 0), -inf: none
    state_f_ptr,  # [NUM_PASSES + 1, B, 3] fp32: row max, top_p * total mass, mass above prefix
    state_i_ptr,  # [NUM_PASSES + 1, B] int32: the threshold key's bits fixed so far
    B, V, S, CHUNK,
    FIRST: tl.constexpr, LAST: tl.constexpr,  # passes run here; pass NUM_PASSES is the mask
    MULTI: tl.constexpr,  # S > 1: one pass per launch, partial histograms through memory
    S_PAD: tl.constexpr, BLOCK: tl.constexpr,
    NUM_BINS: tl.constexpr, DIGIT_BITS: tl.constexpr, NUM_PASSES: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, V)
    base = logits_ptr + row.to(tl.int64) * stride_row
    kth = tl.load(kth_ptr + row)  # the top-k cut (-inf: none); survivors are x >= kth
    p = tl.load(top_p_ptr + row)
    active = p < 1.0  # rows at top_p = 1 only apply their top-k in the mask pass
    scan_end = tl.where(active, end, start)
    bins = tl.arange(0, NUM_BINS)
    neg_inf = float("-inf")

    hist = tl.zeros([NUM_BINS], dtype=tl.float32)  # the previous pass's masses, this launch
    cmax = tl.full([], neg_inf, tl.float32)
    m = cmax  # the row's largest logit: weights are exp(x - m)
    pz = tl.full([], 0.0, tl.float32)  # top_p * the survivors' total mass
    above = tl.full([], 0.0, tl.float32)  # mass of survivors whose key's prefix is larger
    prefix = tl.full([], 0, tl.uint32)
    for j in tl.static_range(FIRST, LAST + 1):
        if j > 0:
            # fix pass j - 1's digit from its histogram over the whole row
            if j - 1 < FIRST:  # it ran in the previous launch: partials from memory
                if j > 1:
                    sf = state_f_ptr + ((j - 1) * B + row) * 3
                    m = tl.load(sf)
                    pz = tl.load(sf + 1)
                    above = tl.load(sf + 2)
                    prefix = tl.load(state_i_ptr + (j - 1) * B + row).to(tl.uint32, bitcast=True)
                chunks = tl.arange(0, S_PAD)
                parts = tl.load(
                    part_ptr + (((j - 1) * B + row) * S + chunks[:, None]) * NUM_BINS
                    + bins[None, :], mask=chunks[:, None] < S, other=0.0,
                )  # [S_PAD, NUM_BINS]
                if j == 1:  # chunk masses were relative to the chunk's max: rescale to the row's
                    cm = tl.load(cmax_ptr + row * S + chunks, mask=chunks < S, other=neg_inf)
                    m = tl.max(cm, axis=0)
                    scale = tl.exp(cm - tl.maximum(m, -3.0e38))  # empty chunks: 0, no inf - inf
                    parts = parts * scale[:, None]
                hist = tl.sum(parts, axis=0)
            elif j == 1:
                m = cmax  # one chunk: its max is the row's
            if j == 1:
                pz = p * tl.sum(hist, axis=0)
            # higher[d]: mass in the bins above d (0 for the top bin, exactly)
            higher = tl.sum(tl.where(bins[None, :] > bins[:, None], hist[None, :], 0.0), axis=1)
            # the lowest bin whose higher bins keep the mass above under top_p holds the
            # threshold; the top bin always qualifies while above < pz (all-(-inf) rows: none)
            fits = above + higher < pz
            digit = tl.min(tl.where(fits, bins, NUM_BINS - 1), axis=0)
            above += tl.sum(tl.where(bins == digit, higher, 0.0), axis=0)
            prefix = prefix | (digit.to(tl.uint32) << (32 - DIGIT_BITS * j))
            if MULTI:
                if chunk == 0:
                    sf = state_f_ptr + (j * B + row) * 3
                    tl.store(sf, m)
                    tl.store(sf + 1, pz)
                    tl.store(sf + 2, above)
                    tl.store(state_i_ptr + j * B + row, prefix.to(tl.int32, bitcast=True))
        if j < NUM_PASSES:
            # pass j: mass per value of the next digit among survivors sharing the prefix
            shift = 32 - DIGIT_BITS * (j + 1)
            # per-lane sums, reduced once after the loop: no cross-thread work per tile
            acc = tl.zeros([BLOCK, NUM_BINS], dtype=tl.float32)
            lane_max = tl.full([BLOCK], neg_inf, tl.float32)  # pass 0: the lane's largest survivor
            for off in range(start, scan_end, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < end, other=neg_inf)
                key = _order_key(x)
                d = ((key >> shift) & (NUM_BINS - 1)).to(tl.int32)
                match = (x >= kth) & (x > neg_inf)
                if j == 0:
                    # one read for the max and the masses: a lane's sums are kept against its own
                    # running max and rescaled as it grows (-3e38 stands in for -inf: no inf - inf)
                    new_max = tl.where(match, tl.maximum(lane_max, x), lane_max)
                    safe = tl.maximum(new_max, -3.0e38)
                    acc = acc * tl.exp(lane_max - safe)[:, None]
                    w = tl.where(match, tl.exp(tl.where(match, x, safe) - safe), 0.0)  # [BLOCK]
                    lane_max = new_max
                    acc += tl.where(d[:, None] == bins[None, :], w[:, None], 0.0)
                else:
                    high = shift + DIGIT_BITS  # the bits above this pass's digit: the prefix
                    match = match & ((key >> high) == (prefix >> high))
                    if tl.max(match.to(tl.int32), axis=0) > 0:  # most tiles, after a few passes
                        w = tl.where(match, tl.exp(tl.where(match, x, m) - m), 0.0)
                        acc += tl.where(d[:, None] == bins[None, :], w[:, None], 0.0)
            if j == 0:
                cmax = tl.max(lane_max, axis=0)
                acc = acc * tl.exp(lane_max - tl.maximum(cmax, -3.0e38))[:, None]
            hist = tl.sum(acc, axis=0)
            if MULTI:
                tl.store(part_ptr + ((j * B + row) * S + chunk) * NUM_BINS + bins, hist)
                if j == 0:
                    tl.store(cmax_ptr + row * S + chunk, cmax)
        else:
            # the mask: below the top-k cut or the top-p threshold key -> -inf
            floor = tl.where(active, prefix, tl.full([], 0, tl.uint32))
            for off in range(start, end, BLOCK):
                cols = off + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < end, other=neg_inf)
                keep = (x >= kth) & (_order_key(x) >= floor)
                tl.store(base + cols, tl.where(keep, x, neg_inf), mask=cols < end)


def top_p_radix(
    logits: torch.Tensor, kth: torch.Tensor, top_p: torch.Tensor, chunks: int | None = None
) -> torch.Tensor:
    """In place: logits below `kth` (a row's top-k cut, -inf: none) or below the row's top-p
    threshold among the survivors become -inf. logits: [B, V] float32 with unit column stride;
    kth, top_p: [B] float32. `chunks`: programs per row (default: enough to fill the GPU)."""
    B, V = logits.shape
    if logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError("top_p_radix needs float32 logits with contiguous rows")
    if B == 0 or V == 0:
        return logits
    kth = kth.to(torch.float32).contiguous()
    top_p = top_p.to(torch.float32).contiguous()
    tiles = triton.cdiv(V, BLOCK)
    if chunks is None:
        chunks = triton.cdiv(2 * num_sms(logits.device), B)
    chunk_tiles = triton.cdiv(tiles, max(1, min(chunks, tiles)))
    CHUNK = chunk_tiles * BLOCK
    S = triton.cdiv(V, CHUNK)
    dev = logits.device
    part = torch.empty(NUM_PASSES, B, S, NUM_BINS, dtype=torch.float32, device=dev)
    cmax = torch.empty(B, S, dtype=torch.float32, device=dev)
    state_f = torch.empty(NUM_PASSES + 1, B, 3, dtype=torch.float32, device=dev)
    state_i = torch.empty(NUM_PASSES + 1, B, dtype=torch.int32, device=dev)
    common = dict(
        MULTI=S > 1, S_PAD=next_pow2(S), BLOCK=BLOCK,
        NUM_BINS=NUM_BINS, DIGIT_BITS=DIGIT_BITS, NUM_PASSES=NUM_PASSES, num_warps=8,
    )  # fmt: skip
    passes = [(j, j) for j in range(NUM_PASSES + 1)] if S > 1 else [(0, NUM_PASSES)]
    for first, last in passes:
        _top_p_kernel[(B, S)](
            logits, logits.stride(0), kth, top_p, part, cmax, state_f, state_i,
            B, V, S, CHUNK, FIRST=first, LAST=last, **common,
        )  # fmt: skip
    return logits


def top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    max_top_k: int,
    top_k_every_row: bool,
) -> torch.Tensor:
    """The signature and semantics of flatout.kernels.reference.top_k_top_p (logits: [B, V]
    float32, may be updated in place), without sorting the vocabulary."""
    if top_p is None:  # top-k alone: one torch.topk for the cut, no sort
        return reference.top_k_top_p(logits, top_k, None, max_top_k, top_k_every_row)
    neg_inf = float("-inf")
    if top_k is not None and top_k_every_row and max_top_k <= MAX_CANDIDATES:
        top = logits.topk(max_top_k, dim=1).values  # [B, K], descending
        kth = top.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))  # [B, 1]
        desc = top.masked_fill(top < kth, neg_inf)
        # survivors tied with the k-th beyond the K candidates add to the normalising mass only
        beyond = (logits >= kth).sum(dim=1, keepdim=True) - (desc >= kth).sum(dim=1, keepdim=True)
        tied = torch.where(kth > neg_inf, (kth - desc[:, :1]).exp(), 0.0)  # [B, 1]
        cut = reference.top_p_threshold(desc, top_p, beyond * tied)  # [B, 1]
        return logits.masked_fill_(logits < torch.maximum(kth, cut), neg_inf)
    if top_k is not None:
        kth = reference.top_k_threshold(logits, top_k, max_top_k).squeeze(1)
    else:
        kth = torch.full_like(top_p, neg_inf)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return top_p_radix(logits, kth, top_p)
