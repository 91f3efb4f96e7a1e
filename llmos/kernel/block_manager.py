"""The KV pool's allocator: reference-counted blocks, block tables, and the prefix cache.

A block is `block_size` token slots in every layer's cache. Full blocks are named by a
hash of their tokens chained with the hash of the block before, so two requests with the
same prefix share the same physical blocks. A block whose last user has gone keeps its
contents and its hash until the memory is needed: freed blocks queue in LRU order and
are reused oldest-first, which is when their cache entry is dropped -- or, with a second
tier (`spill`/`restore`, wired by the context switcher to a PrefixStore in host memory),
moved there, to be copied back by a later request instead of recomputed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from llmos.kernel.request import Sequence


def block_hash(prev_hash: int | None, tokens: list[int] | tuple[int, ...]) -> int:
    return hash((prev_hash, tuple(tokens)))


def root_hash(seq: Sequence) -> int | None:
    """What a sequence's first block hash chains from: nothing for the base model, the
    adapter's registration under a LoRA adapter, so KV is never shared across adapters."""
    return None if seq.adapter_id is None else hash(("lora", seq.adapter_id))


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.tokens: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in LRU order (oldest first); some still hold a cached prefix.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.prefix_queries = 0   # prompt blocks looked up
        self.prefix_hits = 0      # of those, found in the cache (in the pool or the second tier)
        self.prefix_restored = 0  # of the hits, copied back from the second tier
        # The second tier: spill(block_id, hash, tokens) keeps an evicted cached block;
        # spilled(hash, tokens) says whether it has one; unspill(hashes) takes them out
        # (before any allocation could push them out) and restore(block_ids, taken) copies
        # them into the pool.
        self.spill: Callable[[int, int, tuple], None] | None = None
        self.spilled: Callable[[int, tuple], bool] = lambda h, tokens: False
        self.unspill: Callable[[list[int]], object] | None = None
        self.restore: Callable[[list[int], object], None] | None = None

    # -- accounting ------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free)

    @property
    def num_cached_blocks(self) -> int:
        """Free blocks that still hold a reusable prefix."""
        return sum(1 for b in self.free if self.blocks[b].hash is not None)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # -- allocation ------------------------------------------------------------------
    def _take_free(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
            if self.spill is not None:
                self.spill(block_id, block.hash, block.tokens)
        block.hash = None
        block.tokens = None
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def match_prefix(self, seq: Sequence) -> tuple[list[int], list[tuple[int, tuple]]]:
        """Cached blocks in the pool that hold the start of seq's tokens, then the (hash,
        tokens) of the blocks after them that the second tier holds. The last token is
        always left to compute, since its logits are needed."""
        if not self.enable_prefix_caching:
            return [], []
        hits: list[int] = []
        spilled: list[tuple[int, tuple]] = []
        prev = root_hash(seq)
        tokens = seq.token_ids
        for i in range((len(tokens) - 1) // self.block_size):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            h = block_hash(prev, chunk)
            block_id = self.hash_to_block.get(h)
            if not spilled and block_id is not None and self.blocks[block_id].tokens == chunk:
                hits.append(block_id)
            elif self.restore is not None and self.spilled(h, chunk):
                spilled.append((h, chunk))
            else:
                break
            prev = h
        return hits, spilled

    def allocate_prompt(self, seq: Sequence, num_new_tokens: int, reserve: int = 0) -> bool:
        """First allocation of a waiting sequence: reuse cached prefix blocks (copying back
        those the second tier holds), then allocate fresh blocks for `num_new_tokens`
        beyond them. `reserve` blocks must stay free afterwards (the watermark). Returns
        False, changing nothing, if it does not fit."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        hits, spilled = self.match_prefix(seq)
        cached = (len(hits) + len(spilled)) * self.block_size
        num_new_tokens = min(num_new_tokens, len(seq) - cached)
        need = -(-(cached + num_new_tokens) // self.block_size) - len(hits)
        reusable_free = sum(1 for b in hits if self.blocks[b].ref_count == 0)
        if len(self.free) - reusable_free - need < reserve:
            return False
        for b in hits:
            self._ref(b)
        if spilled:
            taken = self.unspill([h for h, _ in spilled])
        restored = [self._take_free() for _ in spilled]
        if spilled:
            self.restore(restored, taken)
        for block_id, (h, chunk) in zip(restored, spilled):
            block = self.blocks[block_id]
            block.hash, block.tokens = h, chunk
            self.hash_to_block.setdefault(h, block_id)
        seq.block_table = hits + restored + [self._take_free() for _ in range(need - len(restored))]
        seq.num_computed_tokens = cached
        seq.num_cached_tokens = cached
        if self.enable_prefix_caching:
            self.prefix_queries += max(0, (len(seq) - 1) // self.block_size)
            self.prefix_hits += len(hits) + len(spilled)
            self.prefix_restored += len(spilled)
        return True

    def can_append(self, seq: Sequence, num_new_tokens: int, reserve: int = 0) -> bool:
        return len(self.free) - self.blocks_needed(seq, num_new_tokens) >= reserve

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> None:
        for _ in range(self.blocks_needed(seq, num_new_tokens)):
            seq.block_table.append(self._take_free())

    def allocate_blocks(self, n: int) -> list[int] | None:
        """n fresh private blocks (for a swap-in), or None if the pool cannot give them."""
        if n > len(self.free):
            return None
        return [self._take_free() for _ in range(n)]

    def tenant_blocks(self, seqs) -> dict[str, int]:
        used: dict[str, int] = {}
        for s in seqs:
            used[s.tenant] = used.get(s.tenant, 0) + len(s.block_table)
        return used

    def free_sequence(self, seq: Sequence) -> None:
        """Return seq's blocks; the ones holding a hashed prefix stay findable until reused.
        Blocks are released last-first so a prefix's tail is evicted before its head."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed_tokens = 0

    def register_full_blocks(self, seq: Sequence, start_computed: int) -> None:
        """After a step computed KV up to seq.num_computed_tokens, name the blocks that
        became full so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        first = start_computed // bs
        last = seq.num_computed_tokens // bs
        if last <= first:
            return
        tokens = seq.token_ids
        prev = self.blocks[seq.block_table[first - 1]].hash if first > 0 else root_hash(seq)
        if first > 0 and prev is None:
            return
        for i in range(first, last):
            block = self.blocks[seq.block_table[i]]
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            if block.hash is None:
                h = block_hash(prev, chunk)
                block.hash, block.tokens = h, chunk
                self.hash_to_block.setdefault(h, block.block_id)
            prev = block.hash
