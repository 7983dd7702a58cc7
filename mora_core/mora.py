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

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from mora_core.errors import AdapterError

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


def rope_tables(r_hat: int, n_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, `[n_blocks, r_hat]`, computed in float32 as the reference does."""
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
        feature, slot = self.compress_map
        out = torch.zeros(core.shape[0], self.in_features, dtype=m.dtype, device=m.device)
        out.index_add_(1, feature.to(m.device), core[:, slot.to(m.device)])
        return out

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
    def add_into(self, w: torch.Tensor, m: torch.Tensor, weight: float = 1.0) -> None:
        """`w += weight * delta(m)` in place, for `w` of shape `[out, in]` (any strides).

        Type 6 touches only its diagonal blocks. The other types add a small
        `[r_hat, in]` matrix of rows, broadcast over row blocks (tile) or row groups
        (repeat each): `W` is read and written once and no `[out, in]` temporary exists.
        """
        out_f, in_f = self.out_features, self.in_features
        if tuple(w.shape) != (out_f, in_f):
            raise ValueError(f"weight shape {tuple(w.shape)} != ({out_f}, {in_f})")
        m = m.to(w.dtype)
        if self.mora_type == 6:
            self._add_block_diagonal(w, m, weight)
            return
        rows = self.compressed_core(m)  # [r_hat, in]
        if weight != 1.0:
            rows.mul_(weight)
        r = self.r_hat
        if self.mora_type in _TILE_DECOMPRESS:
            full = out_f // r
            if full:
                w[: full * r].view(full, r, in_f).add_(rows) if w.is_contiguous() else \
                    _add_tiled_strided(w[: full * r], rows, full)
            if out_f % r:
                w[full * r:].add_(rows[: out_f % r])
            return
        q, rem = divmod(out_f, r)
        big = rem * (q + 1)
        if rem:
            _add_grouped(w[:big], rows[:rem], q + 1)
        if q:
            _add_grouped(w[big:], rows[rem:], q)

    def _add_block_diagonal(self, w: torch.Tensor, m: torch.Tensor, weight: float) -> None:
        r, nb, in_f = self.r_hat, self.n_blocks, self.in_features
        blocks = self.rotated_blocks(m)
        if weight != 1.0:
            blocks.mul_(weight)
        period = nb * r
        for row0 in range(0, self.out_features, r):
            b = (row0 % period) // r
            rows = slice(row0, min(row0 + r, self.out_features))
            blk = blocks[b][: rows.stop - rows.start]
            # columns of block b: positions b*r .. b*r+r-1, feature = position mod in_f
            col0 = b * r
            if col0 + r <= in_f:
                w[rows, col0: col0 + r].add_(blk)
            else:
                pos = torch.arange(col0, col0 + r) % in_f
                w[rows].index_add_(1, pos, blk)


def _add_tiled_strided(w: torch.Tensor, rows: torch.Tensor, full: int) -> None:
    r = rows.shape[0]
    for i in range(full):
        w[i * r: (i + 1) * r].add_(rows)


def _add_grouped(w: torch.Tensor, rows: torch.Tensor, size: int) -> None:
    """Add row `g` of `rows` to the `size` consecutive rows of group `g` of `w`."""
    k, in_f = rows.shape
    if w.is_contiguous():
        w.view(k, size, in_f).add_(rows.unsqueeze(1))
    else:
        for g in range(k):
            w[g * size: (g + 1) * size].add_(rows[g])
