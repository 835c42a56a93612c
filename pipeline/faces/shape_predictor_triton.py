"""The shape predictor's in-order tree sum as one Triton kernel (CUDA).

dlib adds each tree's leaf vector to the shape one tree after the other in float32; any other
order rounds differently and moves points (pipeline/faces/shape_predictor_torch.py). In eager
PyTorch that order costs one kernel launch per tree (7,500 for the 5-point model). Here each
element of the shape is one lane that walks the trees in order, so a cascade level is one launch
and the adds are still plain float32 adds in dlib's order (adds only: nothing to fuse into FMAs).

Imported only on CUDA (or under ``TRITON_INTERPRET=1``, which runs it on the CPU with numpy and
is how the tests check it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _leaf_sum_kernel(acc_ptr, leaf_ptr, n_values, n_trees, width, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_values
    row = offs // width
    col = offs % width
    acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    first = row * (n_trees * width) + col
    for t in range(n_trees):
        acc = acc + tl.load(leaf_ptr + first + t * width, mask=mask, other=0.0)
    tl.store(acc_ptr + offs, acc, mask=mask)


def sequential_leaf_sum(shape: torch.Tensor, leaves: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``shape`` (N, D) float32 plus ``leaves`` (N, T, D) float32 summed over T in order:
    ``((shape + leaves[:, 0]) + leaves[:, 1]) + ...``, rounded to float32 after every add."""
    n, t, d = leaves.shape
    if shape.shape != (n, d) or shape.dtype != torch.float32 or leaves.dtype != torch.float32:
        raise ValueError(f"expected float32 (N, D) and (N, T, D), got {tuple(shape.shape)} {tuple(leaves.shape)}")
    if n * t * d >= 2**31:
        raise ValueError(f"{n} faces x {t} trees x {d} values is past the kernel's int32 offsets; split the batch")
    acc = shape.contiguous().clone()
    leaves = leaves.contiguous()
    if n:
        _leaf_sum_kernel[(triton.cdiv(n * d, block),)](acc, leaves, n * d, t, d, BLOCK=block)
    return acc
