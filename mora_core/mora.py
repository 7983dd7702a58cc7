"""MoRA's compress and decompress operators, as index maps (arXiv 2405.12130).

Every MoRA type is `y = decompress(M @ compress(x))` with fixed, linear compress and
decompress operators. Both are 0/1 selections or sums of input positions, so they are
represented here by *index maps* rather than matrices:

- compress: a list of (input position `p`, feature `f(p)`, compressed slot `s(p)`):
  slot `s` receives the sum of the features mapped to it;
- decompress: output feature `o` reads compressed slot `d(o)`.

The dense update is then `delta[o, j] = sum_{p: f(p)=j} Mx[d(o), s(p)]`, where `Mx` is `M`
(types 1-4) or the block-diagonal `M R_b` of type 6. The merge never builds `delta` when the
structure allows better (see `add_into`).

The definitions follow `../shared/golden/mora/README.md`, which documents the authors'
implementation (kongds/MoRA, peft-mora). Where that implementation crashes (type 6 with
one input block; types 1/4/6 when `in_f < r_hat / 2` in the forward), the operators'
mathematical definition is used (positions wrap around the features as often as needed),
so merged weights and the unmerged forward always agree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from mora_core.errors import AdapterError
from mora_core.region import Region

MORA_TYPES = (1, 2, 3, 4, 6)
_CYCLIC_COMPRESS = (1, 4, 6)
_TILE_DECOMPRESS = (1, 3)


def mora_rank(in_features: int, out_features: int, r: int, mora_type: int) -> int:
    """`r_hat = int(sqrt((in+out)*r) + 0.5)`, rounded down to even for type 6."""
    r_hat = int(math.sqrt((in_features + out_features) * r) + 0.5)
    if mora_type == 6:
        r_hat = r_hat // 2 * 2
    return r_hat


def _groups(n: int, k: int) -> torch.Tensor:
    """Group index of each of `n` positions split into `k` contiguous groups.

    The first `n % k` groups hold `n // k + 1` positions, the others `n // k`.
    """
    q, m = divmod(n, k)
    sizes = torch.tensor([q + 1] * m + [q] * (k - m), dtype=torch.long)
    return torch.repeat_interleave(torch.arange(k), sizes)


@functools.lru_cache(maxsize=64)
def rope_tables(r_hat: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, `[n_blocks, r_hat]`, computed in float32 as the reference does.

    Cached (every layer of a model shares a few shapes): callers must not modify them.
    """
    inv_freq = 1.0 / (10000 ** (torch.arange(0, r_hat, 2).float() / r_hat))
    t = torch.arange(n_blocks)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@dataclass(frozen=True)
class MoraOperator:
    """The fixed part of one MoRA layer: shapes, type and the derived index maps."""

    in_features: int
    out_features: int
    r_hat: int
    mora_type: int

    def __post_init__(self) -> None:
        if self.mora_type not in MORA_TYPES:
            raise AdapterError(f"mora_type {self.mora_type} is not one of {MORA_TYPES}")
        if self.r_hat < 1:
            raise AdapterError(f"r_hat must be positive, got {self.r_hat}")
        if self.mora_type == 6 and self.r_hat % 2:
            raise AdapterError(f"MoRA type 6 needs an even r_hat, got {self.r_hat}")

    # ------------------------------------------------------------------ index maps
    @cached_property
    def n_blocks(self) -> int:
        """Input blocks of length r_hat after wrap-around padding (cyclic types)."""
        return -(-self.in_features // self.r_hat)

    @cached_property
    def compress_width(self) -> int:
        """Length of the compressed vector fed to the decompressor."""
        return self.n_blocks * self.r_hat if self.mora_type == 6 else self.r_hat

    @cached_property
    def compress_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(feature, slot) per input position; slots index the compressed vector.

        For type 6 the slot is `block * r_hat + k` (blocks are kept apart, not summed).
        """
        n, r = self.in_features, self.r_hat
        if self.mora_type in _CYCLIC_COMPRESS:
            pos = torch.arange(self.n_blocks * r)
            feature = pos % n
            slot = pos if self.mora_type == 6 else pos % r
        else:
            feature = torch.arange(n)
            slot = _groups(n, r)
        return feature, slot

    @cached_property
    def decompress_map(self) -> torch.Tensor:
        """Compressed slot read by each output feature."""
        out, width = self.out_features, self.compress_width
        if self.mora_type == 6 or self.mora_type in _TILE_DECOMPRESS:
            return torch.arange(out) % width
        return _groups(out, self.r_hat)

    def core(self, m: torch.Tensor) -> torch.Tensor:
        """The matrix between compress and decompress: `M`, or block-diag(`M R_b`) for type 6."""
        if self.mora_type != 6:
            return m
        blocks = self.rotated_blocks(m)
        return torch.block_diag(*blocks)

    def rotated_blocks(self, m: torch.Tensor) -> torch.Tensor:
        """`[n_blocks, r_hat, r_hat]`: `M @ R_b` for each block `b` (type 6 only)."""
        r, h = self.r_hat, self.r_hat // 2
        cos, sin = rope_tables(r, self.n_blocks)
        cos, sin = cos.to(m.dtype), sin.to(m.dtype)
        # rot(v) = v*cos + rotate_half(v)*sin, rotate_half(v) = [-v[h:], v[:h]]
        # M @ R_b: column k of M scaled by cos[k], plus the rotate_half terms moved to
        # their source column: column k+h gets -M[:, k]*sin[k]; column k-h gets M[:, k]*sin[k].
        out = m.unsqueeze(0) * cos.unsqueeze(1)
        out[:, :, h:] -= m[:, :h].unsqueeze(0) * sin[:, None, :h]
        out[:, :, :h] += m[:, h:].unsqueeze(0) * sin[:, None, h:]
        return out

    # ------------------------------------------------------------------ dense forms
    def compressed_core(self, m: torch.Tensor) -> torch.Tensor:
        """`core(M) @ C`: `[compress_width_out, in_features]`, the per-slot rows of delta."""
        core = self.core(m)
        n = self.in_features
        if self.mora_type in _CYCLIC_COMPRESS:
            # position p feeds feature p % n from column p % r (types 1/4) or p (type 6):
            # lay the positions out once, then fold the wrapped tail onto the head with
            # contiguous slices (index_add_ along dim 1 is a strided, per-column loop).
            cols = core.repeat(1, self.n_blocks) if self.mora_type != 6 else core
            out = cols[:, :n].clone()
            rest = cols[:, n:]
            while rest.shape[1]:
                k = min(n, rest.shape[1])
                out[:, :k] += rest[:, :k]
                rest = rest[:, k:]
            return out
        _, slot = self.compress_map  # grouped: feature j reads its group's column
        return core[:, slot.to(m.device)]

    def delta(self, m: torch.Tensor) -> torch.Tensor:
        """Dense `[out_features, in_features]` update, `y = x @ delta.T`."""
        return self.compressed_core(m)[self.decompress_map.to(m.device)]

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Unmerged adapter branch: `decompress(core(M) @ compress(x))`, no dense delta."""
        feature, slot = self.compress_map
        xs = x[..., feature.to(x.device)]
        c = torch.zeros(*x.shape[:-1], self.compress_width, dtype=x.dtype, device=x.device)
        c.index_add_(-1, slot.to(x.device), xs)
        if self.mora_type == 6:
            nb, r = self.n_blocks, self.r_hat
            cb = c.reshape(*c.shape[:-1], nb, r)
            h = r // 2
            cos, sin = rope_tables(r, nb)
            cos, sin = cos.to(x.dtype).to(x.device), sin.to(x.dtype).to(x.device)
            rot = cb * cos + torch.cat((-cb[..., h:], cb[..., :h]), dim=-1) * sin
            y = (rot @ m.T).reshape(*c.shape[:-1], nb * r)
        else:
            y = c @ m.T
        return y[..., self.decompress_map.to(x.device)]

    # ------------------------------------------------------------------ fused merge
    def footprint(self) -> tuple[Region, ...] | None:
        """The regions of the logical `[out, in]` weight that `add_into` reads and writes;
        None when it is all of it. Type 6 touches only its diagonal blocks (row block `i` on
        input block `i mod n_blocks`), so a merge need not widen and round the rest of the
        tensor (its cast back is the identity). They are the very regions `add_into` writes
        through (`_type6_layout`): one per period for its whole diagonal blocks, one per
        contiguous column run of a ragged or wrapped block (merged across periods).
        """
        if self.mora_type != 6:
            return None
        diagonals, runs = self._type6_layout
        return diagonals + tuple(region for region, _, _ in runs)

    @cached_property
    def _type6_layout(self) -> tuple[tuple[Region, ...], tuple[tuple[Region, int, int], ...]]:
        """Where type 6's blocks land on the logical `[out, in]` weight.

        `diagonals`: per period of `n_blocks * r_hat` rows, the blocks that lie whole on the
        diagonal (block `b` at rows `row0 + b*r`, columns `b*r`): one region of `count` blocks,
        step `(r, r)`. `runs`: `(region, b, k0)` for every other block `b` (ragged last row
        block, wrapped last column block), one per contiguous column run, which receives
        columns `k0 .. k0 + region.cols` of the block. A run recurring in every period at the
        same columns with the same height is one region (step: the period). Runs of one
        block onto the same rows keep their column order (they overlap when in < r_hat).
        """
        r, nb, in_f, out_f = self.r_hat, self.n_blocks, self.in_features, self.out_features
        used = min(nb, -(-out_f // r))
        period = nb * r
        whole_cols = min(in_f // r, used)  # blocks b < this need no column wrap
        diagonals: list[Region] = []
        runs: dict[tuple[int, int, int, int, int], list[int]] = {}  # (b, k0, rows, col, cols) -> tops
        for row0 in range(0, out_f, period):
            k = min(whole_cols, (out_f - row0) // r)
            if k:
                diagonals.append(Region(row0, 0, r, r, k, (r, r)))
            for b in range(k, used):
                top = row0 + b * r
                if top >= out_f:
                    break
                rows = min(r, out_f - top)
                k0 = 0
                while k0 < r:
                    c = (b * r + k0) % in_f
                    span = min(r - k0, in_f - c)
                    runs.setdefault((b, k0, rows, c, span), []).append(top)
                    k0 += span
        merged: list[tuple[Region, int, int]] = []
        for (b, k0, rows, c, span), tops in runs.items():
            first = 0
            for i in range(1, len(tops) + 1):  # consecutive periods: one region
                if i == len(tops) or tops[i] != tops[i - 1] + period:
                    merged.append((Region(tops[first], c, rows, span, i - first, (period, 0)), b, k0))
                    first = i
        return tuple(diagonals), tuple(merged)

    def add_into(self, w: torch.Tensor, m: torch.Tensor, weight: float = 1.0) -> None:
        """`w += weight * delta(m)` in place, for `w` of shape `[out, in]` (any strides).

        Type 6 touches only its diagonal blocks. The other types add a small
        `[r_hat, in]` matrix of rows, broadcast over row blocks (tile) or row groups
        (repeat each): `W` is read and written once and no `[out, in]` temporary exists.
        """
        out_f, in_f = self.out_features, self.in_features
        if tuple(w.shape) != (out_f, in_f):
            raise ValueError(f"weight shape {tuple(w.shape)} != ({out_f}, {in_f})")
        if self.mora_type == 6:
            self.add_into_regions([region.view(w) for region in self.footprint()], m, weight)
            return
        m = m.to(w.dtype)
        if self.mora_type == 1 and self.r_hat <= in_f:
            self._add_tiled(w, m if weight == 1.0 else m * weight)
            return
        rows = self.compressed_core(m)  # [r_hat, in]
        if weight != 1.0:
            rows.mul_(weight)
        r = self.r_hat
        if self.mora_type in _TILE_DECOMPRESS:
            full = out_f // r
            if full:
                w[: full * r].unflatten(0, (full, r)).add_(rows)
            if out_f % r:
                w[full * r:].add_(rows[: out_f % r])
            return
        q, rem = divmod(out_f, r)
        big = rem * (q + 1)
        if rem:
            _add_grouped(w[:big], rows[:rem], q + 1)
        if q:
            _add_grouped(w[big:], rows[rem:], q)

    def _add_tiled(self, w: torch.Tensor, m: torch.Tensor) -> None:
        """Type 1: `delta[o, j] = M[o % r, j % r]`, plus `M[o % r, c + j]` on the first
        `extra = n_blocks * r - in` columns (the wrapped positions, `c = r - extra`).

        Added as broadcast views of `M` on `W`: no `[r, in]` or `[out, in]` temporary.
        """
        r, out_f, in_f = self.r_hat, self.out_features, self.in_features
        full_c, rem_c = divmod(in_f, r)
        full_r, rem_r = divmod(out_f, r)
        extra = self.n_blocks * r - in_f

        def add_row_tiled(cols: slice, x: torch.Tensor) -> None:  # x: [r, width]
            part = w[:, cols]
            if full_r:
                part[: full_r * r].unflatten(0, (full_r, r)).add_(x)
            if rem_r:
                part[full_r * r:].add_(x[:rem_r])

        if full_c:
            x = m.unsqueeze(1)  # [r, 1, r] against [.., r, full_c, r]
            part = w[:, : full_c * r]
            if full_r:
                part[: full_r * r].unflatten(1, (full_c, r)).unflatten(0, (full_r, r)).add_(x)
            if rem_r:
                part[full_r * r:].unflatten(1, (full_c, r)).add_(x[:rem_r])
        if rem_c:
            add_row_tiled(slice(full_c * r, in_f), m[:, :rem_c])
        if extra:
            add_row_tiled(slice(0, extra), m[:, r - extra:])

    def add_into_regions(self, views: Sequence[torch.Tensor], m: torch.Tensor, weight: float = 1.0) -> None:
        """Type 6: `views[i] += weight * delta(m)` on region `i` of `footprint()`, each view a
        `[count, rows, cols]` tensor in the logical orientation holding that region's elements
        (views of the weight, as `add_into` passes, or a compact copy of regions that do not
        overlap). Row block `i` gets `M R_b` (b = i mod n_blocks) on input block `b`.

        All whole diagonal blocks of a period are one view, updated in place (three fused
        multiply-adds, no temporary); the ragged last row block and the wrapped last column
        block are built once and added per column run. Few ops and no large temporaries
        matter: on a busy machine each multi-threaded op costs ~1 ms of scheduling, and
        fresh memory costs page faults.
        """
        if self.mora_type != 6:
            raise ValueError(f"MoRA type {self.mora_type} updates the whole weight (no footprint)")
        diagonals, runs = self._type6_layout
        shapes = [(region.count, region.rows, region.cols) for region in diagonals + tuple(g for g, _, _ in runs)]
        if [tuple(v.shape) for v in views] != shapes:
            raise ValueError(f"views {[tuple(v.shape) for v in views]} are not the footprint's regions {shapes}")
        m = m.to(views[0].dtype)
        r, h = self.r_hat, self.r_hat // 2
        cos, sin = rope_tables(r, self.n_blocks)
        cos, sin = cos.to(m.dtype), sin.to(m.dtype)
        if weight != 1.0:
            m = m * weight
        for region, diag in zip(diagonals, views):  # diag[b] += M R_b, written in place
            k = region.count
            diag.addcmul_(m.unsqueeze(0), cos[:k, None, :])
            diag[:, :, h:].addcmul_(m[:, :h].unsqueeze(0), sin[:k, None, :h], value=-1)
            diag[:, :, :h].addcmul_(m[:, h:].unsqueeze(0), sin[:k, None, h:])
        blocks: dict[int, torch.Tensor] = {}
        for (region, b, k0), view in zip(runs, views[len(diagonals):]):
            if b not in blocks:  # the same block recurs every period: build it once
                blk = m * cos[b]
                blk[:, h:].addcmul_(m[:, :h], sin[b, :h], value=-1)
                blk[:, :h].addcmul_(m[:, h:], sin[b, h:])
                blocks[b] = blk
            view.add_(blocks[b][: region.rows, k0: k0 + region.cols])


def _add_grouped(w: torch.Tensor, rows: torch.Tensor, size: int) -> None:
    """Add row `g` of `rows` to the `size` consecutive rows of group `g` of `w`."""
    w.unflatten(0, (rows.shape[0], size)).add_(rows.unsqueeze(1))
