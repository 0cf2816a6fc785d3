"""Paged KV-cache bookkeeping (pure Python, no torch).

The cache is `num_blocks` blocks of `block_size` token slots. A sequence owns a block table (list
of block ids); a block may be shared by several sequences (reference counted) when prefix caching
finds that they start with the same tokens.

Prefix caching: once a block is full and its K/V computed, it is registered under a chained hash
of (previous block's hash, its token ids), so equal prefixes map to equal hashes. When its last
reference goes, a hashed block is not wiped: it joins an LRU of evictable cached blocks, where a
later sequence with the same prefix can find it again, and from which the allocator takes the
least recently freed block when no never-used block is left.

A prefix-LM sequence (ChatGLM-6B v1) computes its prompt's K/V bidirectionally, so a block's K/V
depend on the whole context, not only on the tokens before it: its chain starts from the hash of
that context (`chain_seed`), and a block is reused only by a sequence with the same context.

Every block is in exactly one state: free (ref 0, no hash), cached (ref 0, hashed, evictable) or
used (ref > 0). `check_integrity` verifies free + cached + used == total.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque

from flatout.engine.request import Sequence


def chain_seed(seq: Sequence) -> bytes | None:
    """Where the sequence's hash chain starts: nothing, or a prefix-LM prompt's context."""
    if seq.prefix is None:
        return None
    return chain_hash(b"prefix-lm", seq.prompt_token_ids[: seq.prefix.context_len])


class NoFreeBlocksError(RuntimeError):
    pass


def chain_hash(prev: bytes | None, token_ids: list[int], extra: bytes = b"") -> bytes:
    """The hash of a block: the previous block's hash, its token ids and `extra` (the content
    hashes of the images whose placeholders it holds, so equal placeholder tokens of different
    images never match)."""
    h = hashlib.blake2b(prev or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    h.update(extra)
    return h.digest()


def block_extra(seq: Sequence, index: int, block_size: int) -> bytes:
    """The content hashes of the sequence's images that overlap its block `index`."""
    start, end = index * block_size, (index + 1) * block_size
    return b"".join(m.content_hash for m in seq.mm_items if m.offset < end and m.end > start)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        self.cached_blocks: OrderedDict[int, None] = OrderedDict()  # LRU: oldest first
        self.hash_to_block: dict[bytes, int] = {}
        # prefix-cache statistics (in tokens), for metrics
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    # -- capacity ---------------------------------------------------------------------------
    @property
    def num_available_blocks(self) -> int:
        """Blocks an allocation can take: free ones plus evictable cached ones."""
        return len(self.free_blocks) + len(self.cached_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_available_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix lookup on admission ---------------------------------------------------------
    def admit(self, seq: Sequence) -> None:
        """Give a sequence that holds no blocks the cached blocks of its longest cached prefix.

        At least one token is always left to compute, since computing it produces the logits
        the sequence samples from."""
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already holds blocks")
        # `num_cached_tokens` is what the admission that first ran found: a preempted sequence's
        # recomputation may hit its own output blocks, which are not prompt tokens
        first = seq.first_scheduled_time is None
        seq.num_computed_tokens = 0
        if first:
            seq.num_cached_tokens = 0
        seq.block_hashes = []
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        tokens = seq.token_ids
        max_full = (len(tokens) - 1) // bs
        prev = chain_seed(seq)
        for i in range(max_full):
            h = chain_hash(prev, tokens[i * bs : (i + 1) * bs], block_extra(seq, i, bs))
            block = self.hash_to_block.get(h)
            if block is None:
                break
            self._ref(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            prev = h
        seq.num_computed_tokens = len(seq.block_table) * bs
        if first:
            seq.num_cached_tokens = seq.num_computed_tokens
        self.num_queried_tokens += len(tokens)
        self.num_hit_tokens += seq.num_computed_tokens

    # -- growth -----------------------------------------------------------------------------
    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= self.num_available_blocks

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Allocate blocks so that the sequence's table holds its computed plus new tokens."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > self.num_available_blocks:
            raise NoFreeBlocksError(f"need {need} blocks, {self.num_available_blocks} available")
        for _ in range(need):
            seq.block_table.append(self._allocate())

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's blocks that are now full and computed in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        # a pending token (sampled, not read back yet) keeps its block unhashed until it is known
        known = min(seq.num_computed_tokens, len(seq.token_ids))
        num_full = min(known // bs, len(seq.block_table))
        if len(seq.block_hashes) >= num_full:
            return
        prev = seq.block_hashes[-1] if seq.block_hashes else chain_seed(seq)
        for i in range(len(seq.block_hashes), num_full):
            h = chain_hash(prev, seq.token_ids[i * bs : (i + 1) * bs], block_extra(seq, i, bs))
            seq.block_hashes.append(h)
            prev = h
            block = seq.block_table[i]
            if self.block_hash[block] is None and h not in self.hash_to_block:
                self.block_hash[block] = h
                self.hash_to_block[h] = block
            # else: an equal block is cached already (two equal prompts computed together);
            # this copy stays unhashed and returns to the free list when released.

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; its cached blocks become evictable, last block first."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] < 0:
                raise RuntimeError(f"block {block} freed twice")
            if self.ref_counts[block] == 0:
                if self.block_hash[block] is not None:
                    self.cached_blocks[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table = []
        seq.block_hashes = []

    def reset_prefix_cache(self) -> None:
        """Forget every evictable cached block (used ones stay registered until released)."""
        for block in list(self.cached_blocks):
            self._evict(block)
            self.free_blocks.append(block)

    # -- internals --------------------------------------------------------------------------
    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.cached_blocks[block]
        self.ref_counts[block] += 1

    def _allocate(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        elif self.cached_blocks:
            block = next(iter(self.cached_blocks))
            self._evict(block)
        else:
            raise NoFreeBlocksError("no free KV-cache blocks")
        self.ref_counts[block] = 1
        return block

    def _evict(self, block: int) -> None:
        del self.cached_blocks[block]
        h = self.block_hash[block]
        if h is not None:
            del self.hash_to_block[h]
            self.block_hash[block] = None

    def check_integrity(self) -> None:
        """Raise if any block is lost, double-counted or inconsistently registered."""
        used = [b for b in range(self.num_blocks) if self.ref_counts[b] > 0]
        free, cached = set(self.free_blocks), set(self.cached_blocks)
        problems = []
        if len(free) != len(self.free_blocks):
            problems.append("a block is twice in the free list")
        if len(free) + len(cached) + len(used) != self.num_blocks:
            problems.append(
                f"free {len(free)} + cached {len(cached)} + used {len(used)} != {self.num_blocks}"
            )
        if free & cached or free & set(used) or cached & set(used):
            problems.append("a block is in two states")
        if any(self.block_hash[b] is not None for b in free):
            problems.append("a free block still has a hash")
        if any(self.block_hash[b] is None for b in cached):
            problems.append("a cached block has no hash")
        if any(self.block_hash[b] != h for h, b in self.hash_to_block.items()):
            problems.append("hash table and block hashes disagree")
        if sum(h is not None for h in self.block_hash) != len(self.hash_to_block):
            problems.append("a hashed block is missing from the hash table")
        if problems:
            raise AssertionError("block manager integrity: " + "; ".join(problems))
