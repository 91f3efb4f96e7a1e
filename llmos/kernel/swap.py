"""The swap tier: where a preempted or suspended sequence's KV blocks wait.

Host memory first (its own budget, `swap_space`), then files in a directory once that is
full. Past a high watermark of the host budget, the coldest entries are compressed to
int8 with one scale per block (per layer, K or V): a quarter of the bytes, at the cost of
a small, measured change in the resumed generation's logits.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class SwapEntry:
    num_blocks: int
    nbytes: int                      # bytes it occupies in its tier now
    tier: str                        # "host" | "disk"
    data: torch.Tensor | None        # [layers, 2, blocks, block_size, KVH, D], float or int8
    scale: torch.Tensor | None       # per-block scales when compressed
    path: Path | None = None
    dtype: torch.dtype = torch.float32

    @property
    def compressed(self) -> bool:
        return self.scale is not None


def compress_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=(3, 4, 5), keepdim=True).clamp_min(1e-8) / 127.0
    return torch.round(x / scale).to(torch.int8), scale.to(torch.float32)


def decompress_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale).to(dtype)


class SwapSpace:
    def __init__(self, host_bytes: int, disk_dir: str | Path | None = None, disk_bytes: int = 64 << 30,
                 compress_watermark: float = 0.8) -> None:
        self.host_budget = host_bytes
        self.disk_budget = disk_bytes
        self.disk_dir = Path(disk_dir) if disk_dir else Path(tempfile.gettempdir()) / f"llmos-swap-{os.getpid()}"
        self.compress_watermark = compress_watermark
        self.entries: OrderedDict[str, SwapEntry] = OrderedDict()   # oldest first
        self.host_used = 0
        self.disk_used = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.bytes_saved_by_compression = 0
        self.num_compressed = 0
        self._names = itertools.count()

    def can_hold(self, nbytes: int) -> bool:
        """Whether an entry of this size fits somewhere (host, possibly after compressing
        older entries, or disk)."""
        return nbytes <= self.host_budget - self.host_used or nbytes <= self.disk_budget - self.disk_used

    def put(self, key: str, data: torch.Tensor) -> SwapEntry:
        nbytes = data.numel() * data.element_size()
        self.bytes_out += nbytes
        entry = SwapEntry(data.shape[2], nbytes, "host", data, None, dtype=data.dtype)
        self.entries[key] = entry
        self.host_used += entry.nbytes
        self._relieve_pressure()
        return entry

    def _relieve_pressure(self) -> None:
        # Compress the coldest host entries past the watermark, then spill to disk past the budget.
        if self.host_used > self.compress_watermark * self.host_budget:
            for key, e in self.entries.items():
                if self.host_used <= self.compress_watermark * self.host_budget:
                    break
                if e.tier == "host" and not e.compressed:
                    q, scale = compress_int8(e.data)
                    new = q.numel() + scale.numel() * 4
                    self.host_used += new - e.nbytes
                    self.bytes_saved_by_compression += e.nbytes - new
                    self.num_compressed += 1
                    e.data, e.scale, e.nbytes = q, scale, new
        for key, e in self.entries.items():
            if self.host_used <= self.host_budget:
                break
            if e.tier == "host":
                self.disk_dir.mkdir(parents=True, exist_ok=True)
                path = self.disk_dir / f"{next(self._names)}.pt"
                torch.save({"data": e.data, "scale": e.scale}, path)
                self.host_used -= e.nbytes
                self.disk_used += e.nbytes
                e.tier, e.path, e.data = "disk", path, None

    def take(self, key: str) -> torch.Tensor:
        """Remove an entry and return its blocks as a full-precision tensor."""
        e = self.entries.pop(key)
        if e.tier == "disk":
            saved = torch.load(e.path)
            e.path.unlink(missing_ok=True)
            self.disk_used -= e.nbytes
            data, scale = saved["data"], saved["scale"]
        else:
            self.host_used -= e.nbytes
            data, scale = e.data, e.scale
        out = decompress_int8(data, scale, e.dtype) if scale is not None else data
        self.bytes_in += out.numel() * out.element_size()
        return out

    def drop(self, key: str) -> None:
        e = self.entries.pop(key, None)
        if e is None:
            return
        if e.tier == "disk":
            e.path.unlink(missing_ok=True)
            self.disk_used -= e.nbytes
        else:
            self.host_used -= e.nbytes

    def __contains__(self, key: str) -> bool:
        return key in self.entries
