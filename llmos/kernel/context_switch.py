"""Context switching: taking a running request's KV out of the pool and putting it back.

Two ways to preempt, as an OS may page a process out or just drop clean pages: `swap`
copies the request's KV blocks to the swap tier and copies them back on resume; `recompute`
drops them and prefills again when the request runs next (prefix-cache hits included).
In `auto` mode the cheaper one is chosen per victim from measured speeds: the copy rate
of every swap, and the prefill rate of every step that prefilled enough tokens to count.
Either way the resumed generation continues exactly where it stopped.

The copying itself (pool <-> host tensors) is the engine's; it is handed in as two
callbacks so the kernel never touches the model.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from llmos.kernel.block_manager import BlockManager
from llmos.kernel.prefix_store import PrefixStore
from llmos.kernel.request import Sequence, SequenceStatus
from llmos.kernel.swap import SwapSpace

ReadBlocks = Callable[[list[int]], torch.Tensor]
WriteBlocks = Callable[[list[int], torch.Tensor], None]


class ContextSwitcher:
    def __init__(self, block_manager: BlockManager, swap: SwapSpace, *, read_blocks: ReadBlocks,
                 write_blocks: WriteBlocks, bytes_per_block: int, mode: str = "auto",
                 prefix_store: PrefixStore | None = None) -> None:
        self.bm = block_manager
        self.swap = swap
        self.read_blocks = read_blocks
        self.write_blocks = write_blocks
        self.bytes_per_block = bytes_per_block
        self.mode = mode
        self.num_preemptions = {"swap": 0, "recompute": 0}
        self.num_swap_ins = 0
        # Cost model inputs, refined from every swap and every prefill step.
        self.copy_bytes_per_s = 4e9
        self.prefill_tokens_per_s = 2000.0
        self.prefix_store = prefix_store
        if prefix_store is not None and prefix_store.wants(bytes_per_block) and block_manager.enable_prefix_caching:
            block_manager.spill = self._spill
            block_manager.spilled = prefix_store.holds
            block_manager.unspill = lambda hashes: [prefix_store.take(h) for h in hashes]
            block_manager.restore = lambda blocks, taken: self.write_blocks(blocks, torch.cat(taken, dim=2))

    def _spill(self, block_id: int, block_hash: int, tokens: tuple) -> None:
        """A cached block the pool is about to reuse: keep its KV in the second tier."""
        self.prefix_store.put(block_hash, tokens, self.read_blocks([block_id]))

    def choose_mode(self, seq: Sequence) -> str:
        """Swap or recompute, by which is cheaper given measured copy and prefill speeds."""
        nbytes = len(seq.block_table) * self.bytes_per_block
        if self.mode == "recompute" or not seq.block_table or not self.swap.can_hold(nbytes):
            return "recompute"
        if self.mode == "swap":
            return "swap"
        swap_cost = 2 * nbytes / self.copy_bytes_per_s
        recompute_cost = seq.num_computed_tokens / self.prefill_tokens_per_s
        return "swap" if swap_cost <= recompute_cost else "recompute"

    def swap_out(self, seq: Sequence, count: bool = True) -> str:
        """Move seq's KV out of the pool (to the swap tier, or dropped); returns the mode used
        and leaves seq SWAPPED or WAITING. `count`: a preemption (not a suspension)."""
        mode = self.choose_mode(seq)
        if mode == "swap":
            t = time.perf_counter()
            data = self.read_blocks(seq.block_table)
            self.swap.put(seq.request_id, data)
            self._observe_copy(data.numel() * data.element_size(), time.perf_counter() - t)
            seq.swapped_tokens = seq.num_computed_tokens
            seq.metrics.num_swaps += 1
            seq.status = SequenceStatus.SWAPPED
        else:
            seq.status = SequenceStatus.WAITING
        self.bm.free_sequence(seq)
        seq.start_waiting(time.monotonic())
        if count:
            self.num_preemptions[mode] += 1
            seq.metrics.num_preemptions += 1
        return mode

    def swapped_blocks(self, seq: Sequence) -> int:
        return self.swap.entries[seq.request_id].num_blocks

    def swap_in(self, seq: Sequence) -> bool:
        """Copy a swapped sequence's KV back into fresh pool blocks; False if they do not fit."""
        blocks = self.bm.allocate_blocks(self.swapped_blocks(seq))
        if blocks is None:
            return False
        t = time.perf_counter()
        data = self.swap.take(seq.request_id)
        self.write_blocks(blocks, data)
        self._observe_copy(data.numel() * data.element_size(), time.perf_counter() - t)
        seq.block_table = blocks
        seq.num_computed_tokens = seq.swapped_tokens
        self.num_swap_ins += 1
        return True

    def _observe_copy(self, nbytes: int, seconds: float) -> None:
        if seconds > 0 and nbytes > (1 << 16):
            self.copy_bytes_per_s = 0.7 * self.copy_bytes_per_s + 0.3 * nbytes / seconds

    def observe_prefill(self, prefill_tokens: int, seconds: float) -> None:
        if prefill_tokens >= 64 and seconds > 0:
            self.prefill_tokens_per_s = 0.7 * self.prefill_tokens_per_s + 0.3 * prefill_tokens / seconds
