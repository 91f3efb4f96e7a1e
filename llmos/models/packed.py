"""A weight matrix kept in a GGUF block format (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K): the bytes of the file,
row by row, so the engine's kernels read 4.5-8.5 bits a weight instead of 32. Plain data;
the arithmetic on it lives in llmos.engine.packed."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmos.errors import ModelLoadError

QK = 32                                               # weights per block: q4_0, q4_1, q8_0
QK_K = 256                                            # weights per super-block: the K-quants
BLOCK_BYTES = {"q4_0": 18, "q4_1": 20, "q8_0": 34,   # fp16 scale (+ fp16 min for q4_1) + the values
               "q4_k": 144, "q5_k": 176, "q6_k": 210}
GGML_TYPES = {"q4_0": 2, "q4_1": 3, "q8_0": 8,       # GGML's type ids, as the kernels take them
              "q4_k": 12, "q5_k": 13, "q6_k": 14}
QUANTIZABLE = ("q8_0", "q4_0", "q4_1")                # what `quantization` can pack a float matrix to


def block_values(qtype: str) -> int:
    """Weights per block of a type: 256 for the K-quants' super-blocks, 32 otherwise."""
    return QK_K if qtype.endswith("_k") else QK


@dataclass
class PackedTensor:
    """[rows, cols] weights as GGUF blocks; `data` is uint8 [rows, cols / block values * block bytes]."""
    data: torch.Tensor
    qtype: str
    shape: tuple[int, int]
    # The same matrix as 16-row VNNI panels, beside `data`, where int8-activation steps use them
    # (llmos.engine.packed.attach_panels); None otherwise.
    panels: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        rows, cols = self.shape
        if self.qtype not in BLOCK_BYTES:
            raise ModelLoadError(f"packed type {self.qtype!r} is not one of {', '.join(BLOCK_BYTES)}")
        bv = block_values(self.qtype)
        if cols % bv:
            raise ModelLoadError(f"a {self.qtype} row must hold a multiple of {bv} values, got {cols}")
        if self.data.numel() != rows * cols // bv * BLOCK_BYTES[self.qtype]:
            raise ModelLoadError(f"{self.qtype} data of {self.data.numel()} bytes cannot hold {rows}x{cols} weights")
        self.data = self.data.reshape(rows, cols // bv * BLOCK_BYTES[self.qtype]).contiguous()

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    def rows(self, index: torch.Tensor) -> "PackedTensor":
        return PackedTensor(self.data.index_select(0, index), self.qtype, (index.numel(), self.shape[1]))

    def permute_rows(self, order: torch.Tensor) -> "PackedTensor":
        """The same matrix with its rows reordered (blocks never span rows)."""
        return PackedTensor(self.data[order], self.qtype, self.shape)

    @staticmethod
    def cat(parts: list["PackedTensor"]) -> "PackedTensor":
        """Stacked rows (q, k and v into one qkv matrix); one type and row length throughout."""
        if len({(p.qtype, p.shape[1]) for p in parts}) != 1:
            raise ModelLoadError("cannot stack packed weights of different types or row lengths: "
                                 + ", ".join(f"{p.qtype}{list(p.shape)}" for p in parts))
        return PackedTensor(torch.cat([p.data for p in parts]), parts[0].qtype,
                            (sum(p.shape[0] for p in parts), parts[0].shape[1]))
