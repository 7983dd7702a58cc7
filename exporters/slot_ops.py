"""The adapter branches of a slot graph, written in torch ops that export to plain ONNX operators.

MoRA is exported with its structure (arXiv 2405.12130), never as a dense matrix:

- compress: types 1/4/6 lay the input positions out cyclically (`Concat` of the features
  and their head when they must wrap), `Reshape` to `[blocks, r_hat]`, then `ReduceSum`
  over the blocks (types 1/4) or keep them apart (type 6, and only the blocks whose
  results reach an output: `ceil(out / r_hat)` of them when that is fewer, the rest of
  the input is never read); types 2/3 sum contiguous feature groups (two `Reshape` +
  `ReduceSum`, the first `in % r_hat` groups one longer);
- type 6 rotates each block (RoPE: `v cos + flip(v) sin'` on the block's two halves, one
  `Slice` with step -1 and constant `[blocks, 2, r_hat/2]` tables: 4 nodes, no Concat/Neg);
- the square matrix `M` (`MatMul`), the only learned part;
- decompress: block copies of the `r_hat` (or `blocks*r_hat`) results over the outputs:
  tiling for types 1/3/6, repeat-each for types 2/4.

The index maps come from `mora_core.mora.MoraOperator`, so the graph and the merge share
one definition. `mora_dense_matrices` gives the same operator as a dense factorisation
(`D core(M) C`), only to measure what the structure buys (bench/).

Mixed batches (Punica's idea in standard operators): per row, the adapter's weights are
gathered from a stack (`Gather` on the adapter index) and applied with a batched
`MatMul`; the last entry of each stack is zero (the base model, index -1).
"""

from __future__ import annotations

import torch

from mora_core.mora import MoraOperator, rope_tables


def lora_branch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`(x A^T) B^T`, A `[rank, in]`, B `[out, rank]` (scale folded into B)."""
    return torch.matmul(torch.matmul(x, a.transpose(0, 1)), b.transpose(0, 1))


class MoraBranch:
    """The fixed operators of one MoRA slot, with their constants built eagerly.

    Built outside any tracing on purpose: index maps and RoPE tables created while the
    exporter traces would be fake tensors (and `rope_tables` is cached process-wide).
    """

    def __init__(self, op: MoraOperator):
        self.op = op
        # type 6 keeps its blocks apart and truncates their results to out_features: blocks
        # past ceil(out / r_hat) reach no output (k/v/down projections), so they are not built
        self.blocks = min(op.n_blocks, -(-op.out_features // op.r_hat)) if op.mora_type == 6 else op.n_blocks
        if op.mora_type == 6:
            cos, sin = rope_tables(op.r_hat, op.n_blocks)
            h = op.r_hat // 2
            cos, sin = cos[: self.blocks].view(-1, 2, h), sin[: self.blocks].view(-1, 2, h)
            # rot(v) = [v0 cos0 - v1 sin0, v1 cos1 + v0 sin1] on the halves v0, v1 of a block:
            # v cos + flip(v) sin' with the halves swapped by one Slice (step -1), no Neg
            self.cos = cos.clone()
            self.sin = torch.stack((-sin[:, 0], sin[:, 1]), 1)  # [blocks, 2, h]

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """`[..., in] -> [..., r_hat]` (types 1-4) or `[..., blocks, r_hat]` (type 6, `self.blocks`)."""
        op = self.op
        n, r, t = op.in_features, op.r_hat, op.mora_type
        if t in (1, 4, 6):
            width = self.blocks * r
            if width > n:  # positions wrap around the features
                full, rest = divmod(width, n)
                x = torch.cat([x] * full + ([x[..., :rest]] if rest else []), dim=-1)
            elif width < n:  # type 6: the inputs of blocks that reach no output are not read
                x = x[..., :width]
            blocks = x.unflatten(-1, (self.blocks, r))
            return blocks if t == 6 else blocks.sum(dim=-2)
        q, m = divmod(n, r)  # grouped: the first m groups hold q + 1 features, the others q
        if q == 0:
            return torch.nn.functional.pad(x, (0, r - n))
        parts = []
        if m:
            parts.append(x[..., : m * (q + 1)].unflatten(-1, (m, q + 1)).sum(dim=-1))
        parts.append(x[..., m * (q + 1):].unflatten(-1, (r - m, q)).sum(dim=-1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def rotate(self, c: torch.Tensor) -> torch.Tensor:
        """Type 6: rotate block b of `[..., blocks, r_hat]` by its RoPE angle (the reference's float32
        tables): `v cos + flip(v) sin'` on the halves (exact: each output is the reference's two
        products and one add)."""
        h = self.op.r_hat // 2
        halves = c.unflatten(-1, (2, h))  # [..., blocks, 2, h]
        cos, sin = self.cos.to(c.dtype), self.sin.to(c.dtype)
        return (halves * cos + halves.flip(-2) * sin).flatten(-2)

    def decompress(self, y: torch.Tensor) -> torch.Tensor:
        """`[..., width] -> [..., out]`, block copies only (an element-wise Gather on the last axis
        costs ~30x more on ONNX Runtime's CPU provider).

        Types 1/3/6 tile the results over the outputs (one `Concat` of whole copies and a
        `Slice` of the last: `out` values written, where `Tile` + `Slice` wrote a rounded-up
        tiling and copied it again); types 2/4 repeat each result over its group of outputs
        (`Tile` on a new axis + `Transpose`; the first `out % r_hat` groups are one longer).
        """
        op = self.op
        out, width = op.out_features, y.shape[-1]
        lead = [1] * (y.dim() - 1)
        if op.mora_type in (1, 3, 6):  # whole copies and the head of one more: one Concat (+ one Slice)
            full, rest = divmod(out, width)
            parts = [y] * full + ([y[..., :rest]] if rest else [])
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        q, m = divmod(out, width)
        if q == 0:
            return y[..., :out]

        def each(part: torch.Tensor, times: int) -> torch.Tensor:
            return part.unsqueeze(-2).repeat(*lead, times, 1).transpose(-1, -2).flatten(-2)

        if m == 0:
            return each(y, q)
        return torch.cat((each(y[..., :m], q + 1), each(y[..., m:], q)), dim=-1)

    def __call__(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """`decompress(M compress(x))` (type 6: rotate the blocks before M), no dense matrix."""
        c = self.compress(x)
        if self.op.mora_type == 6:
            c = self.rotate(c)
        y = torch.matmul(c, m.transpose(0, 1))
        if self.op.mora_type == 6:
            y = y.flatten(-2)
        return self.decompress(y)

    def rows(self, x: torch.Tensor, mt_stack: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Per-row MoRA: compress once, `M^T` gathered per row (`[n+1, r, r]` stack), batched MatMul."""
        c = self.compress(x)
        mt = torch.index_select(mt_stack, 0, rows)  # [batch, r, r]
        if self.op.mora_type == 6:
            c = self.rotate(c)  # [batch, seq, nb, r]
            y = torch.matmul(c.flatten(1, 2), mt).unflatten(1, (c.shape[1], self.blocks)).flatten(-2)
        else:
            y = torch.matmul(c, mt)
        return self.decompress(y)


# ----------------------------------------------------------------------------- mixed batches

def lora_rows(x: torch.Tensor, at_stack: torch.Tensor, bt_stack: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per-row LoRA: `x[i] @ At[rows[i]] @ Bt[rows[i]]`; stacks `[n+1, in, R]`, `[n+1, R, out]`."""
    at = torch.index_select(at_stack, 0, rows)  # [batch, in, R]
    bt = torch.index_select(bt_stack, 0, rows)  # [batch, R, out]
    return torch.matmul(torch.matmul(x, at), bt)


# ----------------------------------------------------------------------------- dense (bench only)

def mora_dense_matrices(op: MoraOperator, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MoRA as a dense factorisation `dW = B A`: A = core(M) C `[width, in]`, B = D `[out, width]`.

    The rank is `r_hat` for types 1-4 and `blocks * r_hat` for type 6 (the blocks whose
    results reach an output, as the structured branch builds). Only for measuring what the
    structured operators buy; the graph never uses it.
    """
    width = MoraBranch(op).blocks * op.r_hat if op.mora_type == 6 else op.r_hat
    a = op.compressed_core(m)[:width]  # core(M) @ C
    b = torch.zeros(op.out_features, width, dtype=m.dtype)
    b[torch.arange(op.out_features), op.decompress_map] = 1.0
    return a, b
