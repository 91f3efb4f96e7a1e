"""A second chance for the prefix cache: KV blocks that held a cached prefix, kept in host
memory when the pool reuses their slots.

The pool keeps a freed block's prefix findable until the block is needed again; under
pressure (other tenants' traffic) that is soon, and an idle conversation or agent loses
the KV of its whole history and must prefill it again when it resumes. Copying a block
out costs a memcpy of one block; prefilling its tokens costs a forward pass over them, so
when the pool evicts a cached block its contents move here, keyed by the same chained
hash, and a later request whose prefix continues into them copies them back instead of
recomputing. Bounded, least recently used first out, and never in the way of a preempted
request's swap (which has its own space)."""

from __future__ import annotations

from collections import OrderedDict

import torch


class PrefixStore:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._entries: OrderedDict[int, tuple[tuple[int, ...], torch.Tensor]] = OrderedDict()
        self.stored = 0          # blocks copied in
        self.restored = 0        # blocks copied back to the pool
        self.dropped = 0         # blocks pushed out by newer ones

    def __len__(self) -> int:
        return len(self._entries)

    def wants(self, nbytes: int) -> bool:
        return 0 < nbytes <= self.capacity_bytes

    def put(self, block_hash: int, tokens: tuple[int, ...], data: torch.Tensor) -> None:
        nbytes = data.numel() * data.element_size()
        if not self.wants(nbytes) or block_hash in self._entries:
            return
        while self.used_bytes + nbytes > self.capacity_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self.used_bytes -= old.numel() * old.element_size()
            self.dropped += 1
        self._entries[block_hash] = (tokens, data)
        self.used_bytes += nbytes
        self.stored += 1

    def holds(self, block_hash: int, tokens: tuple[int, ...]) -> bool:
        entry = self._entries.get(block_hash)
        return entry is not None and entry[0] == tokens

    def take(self, block_hash: int) -> torch.Tensor:
        """The block's KV, leaving the store (it is back in the pool, findable there)."""
        _, data = self._entries.pop(block_hash)
        self.used_bytes -= data.numel() * data.element_size()
        self.restored += 1
        return data
