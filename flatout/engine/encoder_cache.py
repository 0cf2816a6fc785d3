"""The engine side's record of the vision encoder outputs the model runner holds (no torch).

An image's encoder output (one embedding per placeholder token) is computed once, in the step
that first schedules any of its placeholder tokens, and kept by the runner under the image's
content hash until no sequence needs it any more: a chunked prefill that splits an image reads
the rest of it from there in later steps, and requests with the same image share one entry.
A sequence needs an entry from the step that schedules its first token of the image until all
of the image's tokens are computed (or it is preempted or finished). Entries nobody needs are
dropped at once; their hashes go to the runner with the next step (`take_freed`).

The cache is bounded by `capacity` embeddings; one image larger than that is still admitted
when the cache is empty, so no image can wait forever.
"""

from __future__ import annotations


class EncoderCache:
    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"encoder cache capacity must be >= 1 (got {capacity})")
        self.capacity = capacity
        self.num_tokens: dict[bytes, int] = {}  # content hash -> embeddings held
        self.users: dict[bytes, set[int]] = {}  # content hash -> ids of sequences needing it
        self.freed: list[bytes] = []  # dropped since the runner last heard
        self.num_used = 0

    def __contains__(self, content_hash: bytes) -> bool:
        return content_hash in self.num_tokens

    def can_add(self, num_tokens: int) -> bool:
        return not self.num_tokens or self.num_used + num_tokens <= self.capacity

    def add(self, content_hash: bytes, num_tokens: int) -> None:
        """Record an entry the runner computes in the step being scheduled."""
        if content_hash in self.num_tokens:
            raise RuntimeError("encoder output cached twice")
        self.num_tokens[content_hash] = num_tokens
        self.users[content_hash] = set()
        self.num_used += num_tokens
        if content_hash in self.freed:  # dropped and wanted again before the runner heard
            self.freed.remove(content_hash)

    def use(self, content_hash: bytes, seq_id: int) -> None:
        self.users[content_hash].add(seq_id)

    def release(self, content_hash: bytes, seq_id: int) -> None:
        """The sequence no longer needs the entry (no-op if it did not); the last user's
        release drops it."""
        users = self.users.get(content_hash)
        if users is None or seq_id not in users:
            return
        users.discard(seq_id)
        if not users:
            del self.users[content_hash]
            self.num_used -= self.num_tokens.pop(content_hash)
            self.freed.append(content_hash)

    def take_freed(self) -> list[bytes]:
        freed, self.freed = self.freed, []
        return freed

    def check_integrity(self) -> None:
        """Raise if an entry has no user (it should have been dropped) or the count is off."""
        problems = []
        if set(self.users) != set(self.num_tokens):
            problems.append("entries and users disagree")
        if any(not u for u in self.users.values()):
            problems.append("an entry without users")
        if sum(self.num_tokens.values()) != self.num_used:
            problems.append("num_used is off")
        if problems:
            raise AssertionError("encoder cache integrity: " + "; ".join(problems))
