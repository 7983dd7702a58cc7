"""Regions of a 2-D weight: a rectangle repeated along a fixed step, seen as one strided view.

An op's footprint (the elements its `add_into` reads and writes) is a list of regions, so
the streaming merge gathers, measures and writes back each region with one torch op rather
than one op per rectangle: MoRA type 6's whole diagonal blocks of a period are one region
(`count` blocks, step `(r_hat, r_hat)`), the same `[count, rows, cols]` view its update
already writes through. A region is described in the logical coordinates of the tensor it
is applied to; `transposed()` maps it to the stored layout of a `[in, out]` (Conv1D) weight.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Region:
    """`count` rectangles of `rows` x `cols` elements; copy `i` has its top-left corner at
    `(row + i * step[0], col + i * step[1])`. The copies must not overlap one another (a
    view written through must not alias itself); separate regions may overlap."""

    row: int
    col: int
    rows: int
    cols: int
    count: int = 1
    step: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if min(self.row, self.col, self.rows, self.cols, *self.step) < 0 or self.count < 1:
            raise ValueError(f"negative extent or no copy in {self}")

    @property
    def numel(self) -> int:
        return self.count * self.rows * self.cols

    def transposed(self) -> Region:
        """The same elements in the transposed tensor."""
        return Region(self.col, self.row, self.cols, self.rows, self.count, (self.step[1], self.step[0]))

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """`[count, rows, cols]` view of the 2-D tensor `t` (any strides): writing it writes `t`.

        Raises ValueError if the region leaves `t` (`as_strided` alone would silently reach
        the neighbouring elements of a larger buffer)."""
        last = self.count - 1
        if (self.row + last * self.step[0] + self.rows > t.shape[0]
                or self.col + last * self.step[1] + self.cols > t.shape[1]):
            raise ValueError(f"{self} does not fit a tensor of shape {tuple(t.shape)}")
        s0, s1 = t.stride()
        return t.as_strided((self.count, self.rows, self.cols), (self.step[0] * s0 + self.step[1] * s1, s0, s1),
                            t.storage_offset() + self.row * s0 + self.col * s1)


@functools.lru_cache(maxsize=256)
def disjoint(regions: tuple[Region, ...]) -> bool:
    """Whether no element lies in two of `regions` (nor in two copies of one): then each
    region's elements can live apart, in a compact buffer, and updates of one never
    reach another. Cached: a model has a few shapes, each merged with the same regions."""
    rects = sorted((r.row + i * r.step[0], r.col + i * r.step[1], r.rows, r.cols)
                   for r in regions for i in range(r.count) if r.rows and r.cols)
    for i, (row, col, rows, cols) in enumerate(rects):
        for row1, col1, _, cols1 in rects[i + 1:]:  # sorted by row: stop past this one's rows
            if row1 >= row + rows:
                break
            if col1 < col + cols and col < col1 + cols1:
                return False
    return True
