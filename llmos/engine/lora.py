"""Batched LoRA: many adapters in one forward pass, none merged into the base weights.

The base projections run once for the whole batch; each token row then adds its own
adapter's low-rank product x @ A @ B (S-LoRA/Punica style). Rows are grouped by adapter:
the rows of each group are gathered into one padded [groups, rows, in] tensor, one
batched matmul shrinks them to the rank, one per target module expands them, and the
results are added back at the rows they came from. A step where one adapter has every
row skips the gather; a step where no row has an adapter costs nothing.

Weights follow the transformer's fused projections (qkv, o, gate_up, down): an adapter's
A for qkv is its q, k and v A's side by side ([in, r_q + r_k + r_v]), so one matmul
shrinks for all three; each target keeps its own B ([r, out_t], scale alpha/r folded in),
expanded into that target's output columns.

Measured on the 2-core AVX2 CPU (benchmarks/lora.py, docs/benchmarks.md; 64 decode rows,
30 layers, rank 16, 4 and 16 adapters): a loop of small matmuls per adapter group costs
1.7-3.7x this batched form, and stacking the groups' weights afresh every step 2-5x; one
block-diagonal B per projection (one expand instead of one per target) is no faster and
takes half as much memory again. So the stacked weights are kept from step to step (a
second copy of the adapters in the batch, `stack_bytes`, outside the adapter budget) and
rebuilt only when an adapter joins the batch or the batch uses less than half of them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmos.models.config import ModelConfig
from llmos.models.lora_loader import LoraCheckpoint, target_shape

# Fused projection -> the target modules in it, in the order of its output columns.
PROJECTIONS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
               "down": ("down_proj",)}


@dataclass
class Proj:
    """Low-rank weights for one fused projection, of one adapter or stacked for several
    (then every tensor has a leading adapter dimension)."""
    a: torch.Tensor                                   # [in, w]: the targets' A side by side
    blocks: list[tuple[int, int, torch.Tensor]]       # per target, by output column: (its columns' start
                                                      # in a, its start in the output, B [r, out_t] * scale)
    span: tuple[int, int]                             # output columns from the first target to the last


class LoraWeights:
    """One adapter in the engine's layout: layers[i][projection] = Proj, absent for a
    projection the adapter does not touch."""

    def __init__(self, ckpt: LoraCheckpoint, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
        self.layers: list[dict[str, Proj]] = []
        for i in range(cfg.num_layers):
            layer = {}
            for proj, targets in PROJECTIONS.items():
                p = _fuse(ckpt, cfg, i, targets)
                if p is not None:
                    layer[proj] = Proj(p.a.to(device=device, dtype=dtype).contiguous(),
                                       [(col, c0, b.to(device=device, dtype=dtype).contiguous())
                                        for col, c0, b in p.blocks], p.span)
            self.layers.append(layer)
        self.nbytes = sum(t.numel() * t.element_size() for layer in self.layers for p in layer.values()
                          for t in [p.a, *(b for _, _, b in p.blocks)])


def _fuse(ckpt: LoraCheckpoint, cfg: ModelConfig, layer: int, targets: tuple[str, ...]) -> Proj | None:
    present = []
    c0 = 0
    for t in targets:
        pair = ckpt.pairs.get((layer, t))
        if pair is not None:
            present.append((c0, pair))
        c0 += target_shape(cfg, t)[0]
    if not present:
        return None
    a = torch.cat([p.a.t() for _, p in present], dim=1)
    cols = [sum(p.rank for _, p in present[:j]) for j in range(len(present))]
    blocks = [(col, c0, (p.b * p.scale).t()) for col, (c0, p) in zip(cols, present)]
    last_c0, last = present[-1]
    return Proj(a, blocks, (present[0][0], last_c0 + last.b.shape[0]))


class LoraBatch:
    """One step's adapter rows, ready for the transformer: `add(layer, projection, x, out)`
    adds each row's low-rank product for that projection to `out` in place."""

    def __init__(self, layers: list[dict[str, Proj]], idx: torch.Tensor | None, shape: tuple[int, int],
                 mask: torch.Tensor | None) -> None:
        self.layers = layers          # [layer][projection] -> Proj, stacked [G, ...] when idx is set
        self.idx = idx                # rows to gather, [G * M] (padded with each group's first row)
        self.shape = shape            # (G, M)
        self.mask = mask              # [G, M, 1]: 0 at padding, or None when no group is padded

    def add(self, layer: int, proj: str, x: torch.Tensor, out: torch.Tensor) -> None:
        p = self.layers[layer].get(proj)
        if p is None:
            return
        if self.idx is None:                     # one adapter, every row
            s = x @ p.a
            for col, c0, b in p.blocks:
                out[:, c0:c0 + b.shape[1]].addmm_(s[:, col:col + b.shape[0]], b)
            return
        g, m = self.shape
        s = torch.bmm(x.index_select(0, self.idx).view(g, m, -1), p.a)
        if self.mask is not None:
            s.mul_(self.mask)
        pieces, c = [], p.span[0]
        for col, c0, b in p.blocks:              # each target's expand, zeros for a target between that none has
            if c0 > c:
                pieces.append(s.new_zeros(g, m, c0 - c))
            pieces.append(torch.bmm(s[:, :, col:col + b.shape[1]], b))
            c = c0 + b.shape[2]
        y = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)
        out[:, p.span[0]:p.span[1]].index_add_(0, self.idx, y.view(g * m, -1))


class LoraBank:
    """The resident adapters' weights, and the stacked weights of the last set of
    adapters a batch used (kept while consecutive steps use the same set)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.adapters: dict[str, LoraWeights] = {}
        self._stack_key: tuple[str, ...] | None = None
        self._stack: list[dict[str, Proj]] | None = None

    def add(self, name: str, weights: LoraWeights) -> None:
        self.drop(name)
        self.adapters[name] = weights

    def drop(self, name: str) -> None:
        self.adapters.pop(name, None)
        if self._stack_key is not None and name in self._stack_key:
            self._stack_key = self._stack = None

    @property
    def stack_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self._stack or [] for p in layer.values()
                   for t in [p.a, *(b for _, _, b in p.blocks)])

    def plan(self, runs: list[tuple[str | None, int]], device: torch.device) -> LoraBatch | None:
        """The step's LoraBatch from its rows in order, as (adapter or None, row count)
        runs; None when no row has an adapter."""
        groups: dict[str, list[int]] = {}
        row = 0
        for name, n in runs:
            if name is not None:
                groups.setdefault(name, []).extend(range(row, row + n))
            row += n
        if not groups:
            return None
        if len(groups) == 1 and len(next(iter(groups.values()))) == row:
            return LoraBatch(self.adapters[next(iter(groups))].layers, None, (1, row), None)
        slots = self._slots(set(groups))
        rows = [groups.get(n, []) for n in slots]
        m = max(len(r) for r in rows)
        pad = next(iter(groups.values()))[0]    # any real row: padding rows are masked to zero
        idx = [i for r in rows for i in r + [r[0] if r else pad] * (m - len(r))]
        mask = None
        if any(len(r) < m for r in rows):
            mask = torch.tensor([[1.0] * len(r) + [0.0] * (m - len(r)) for r in rows], dtype=self._dtype(),
                                device=device).unsqueeze(-1)
        return LoraBatch(self._stack, torch.tensor(idx, dtype=torch.long, device=device), (len(slots), m), mask)

    def _slots(self, active: set[str]) -> tuple[str, ...]:
        """The adapters stacked for a step that uses `active`: the kept stack if it holds
        them all and they are at least half of it (its other slots get masked padding
        rows), else a new stack of them and, up to twice their number, the kept ones
        (so an adapter that leaves the batch for a while does not force two rebuilds)."""
        key = self._stack_key
        if key is not None and active <= set(key) and 2 * len(active) >= len(key):
            return key
        union = active | set(key or ())
        self._stacked(tuple(sorted(union if len(union) <= 2 * len(active) else active)))
        return self._stack_key

    def _dtype(self) -> torch.dtype:
        return next(p.a.dtype for layer in self._stack for p in layer.values())

    def _stacked(self, names: tuple[str, ...]) -> None:
        """Per layer and projection, the named adapters' weights stacked along a new first
        dimension: each target gets the columns of its widest rank; an adapter's narrower
        rank, or a target or projection it lacks, is zeros."""
        self._stack_key = self._stack = None     # free the old stack before building the new one
        stack: list[dict[str, Proj]] = []
        for i in range(self.num_layers):
            layer = {}
            for proj in PROJECTIONS:
                projs = [self.adapters[n].layers[i].get(proj) for n in names]
                present = [p for p in projs if p is not None]
                if present:
                    layer[proj] = _stack(projs, present[0].a)
            stack.append(layer)
        self._stack_key, self._stack = names, stack


def _stack(projs: list[Proj | None], like: torch.Tensor) -> Proj:
    ranks: dict[int, int] = {}                   # target (by output column) -> widest rank
    outs: dict[int, int] = {}
    for p in projs:
        for _, c0, b in p.blocks if p is not None else []:
            ranks[c0] = max(ranks.get(c0, 0), b.shape[0])
            outs[c0] = b.shape[1]
    targets = sorted(ranks)
    cols = dict(zip(targets, [sum(ranks[t] for t in targets[:j]) for j in range(len(targets))]))
    a = like.new_zeros(len(projs), like.shape[0], sum(ranks.values()))
    bs = {t: like.new_zeros(len(projs), ranks[t], outs[t]) for t in targets}
    for g, p in enumerate(projs):
        for col, c0, b in p.blocks if p is not None else []:
            a[g, :, cols[c0]:cols[c0] + b.shape[0]] = p.a[:, col:col + b.shape[0]]
            bs[c0][g, :b.shape[0]] = b
    return Proj(a, [(cols[t], t, bs[t]) for t in targets], (targets[0], targets[-1] + outs[targets[-1]]))
