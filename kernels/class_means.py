"""Triton kernels for per-class (segmented) means and the class-mean matching loss.

The launcher sorts row indices by label once (stable sort + searched class offsets), so each
program reduces the rows of one class over one BLOCK_D slice of features: every feature is read
once, sums accumulate in fp32 (fp64 for fp64), no atomics, deterministic. With a reference mean
(the real side of DM's loss) the epilogue also writes ``diff = mean − mean_ref`` for classes present
on both sides and the partial sums of diff² per (class, slice). The backward is one gather pass:
``grad_x[i] = coef[y_i] · G[y_i]``.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtypes

BLOCK_N = 16
BLOCK_D = 128


@triton.jit
def _segment_mean_kernel(x_ptr, perm_ptr, offsets_ptr, mean_ptr, ref_ptr, ref_count_ptr, partial_ptr, D, num_dblocks,
                         HAS_REF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         ACC_DTYPE: tl.constexpr):
    c = tl.program_id(0)
    pd = tl.program_id(1)
    start = tl.load(offsets_ptr + c)
    end = tl.load(offsets_ptr + c + 1)
    cols = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC_DTYPE)
    for r0 in range(start, end, BLOCK_N):
        ridx = r0 + tl.arange(0, BLOCK_N)
        rmask = ridx < end
        rows = tl.load(perm_ptr + ridx, mask=rmask, other=0).to(tl.int64)
        tile = tl.load(x_ptr + rows[:, None] * D + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
        acc += tile.to(ACC_DTYPE)
    count = end - start
    mean = tl.sum(acc, axis=0) / tl.maximum(count, 1).to(ACC_DTYPE)
    out_offs = c.to(tl.int64) * D + cols
    if HAS_REF:
        ref = tl.load(ref_ptr + out_offs, mask=cmask, other=0.0).to(ACC_DTYPE)
        both = (count > 0) & (tl.load(ref_count_ptr + c) > 0)
        diff = tl.where(cmask & both, mean - ref, 0.0)
        tl.store(mean_ptr + out_offs, diff, mask=cmask)
        tl.store(partial_ptr + c * num_dblocks + pd, tl.sum(diff * diff, axis=0))
    else:
        tl.store(mean_ptr + out_offs, mean.to(mean_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _gather_scale_kernel(g_ptr, coef_ptr, labels_ptr, out_ptr, N, D,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rmask = rows < N
    cmask = cols < D
    lab = tl.load(labels_ptr + rows, mask=rmask, other=0).to(tl.int64)
    coef = tl.load(coef_ptr + lab, mask=rmask, other=0.0).to(ACC_DTYPE)
    mask = rmask[:, None] & cmask[None, :]
    g = tl.load(g_ptr + lab[:, None] * D + cols[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    val = coef[:, None] * g
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], val.to(out_ptr.dtype.element_ty), mask=mask)


def sort_by_label(labels: torch.Tensor, num_classes: int):
    """(row permutation grouping each class, class offsets (C+1,), counts (C,) int64), with no host
    sync: offsets are where the class ids 0..C fall in the sorted labels (bincount would read the
    label maximum on the host first)."""
    sorted_labels, perm = torch.sort(labels, stable=True)
    offsets = torch.searchsorted(sorted_labels, torch.arange(num_classes + 1, device=labels.device,
                                                              dtype=labels.dtype))
    return perm, offsets, offsets[1:] - offsets[:-1]


def segment_means(x: torch.Tensor, labels: torch.Tensor, num_classes: int, ref=None, ref_counts=None):
    """x (N, D) contiguous, labels (N,) int64. Without ref: (means (C, D) x.dtype, counts).
    With ref (C, D) and ref_counts (C,): (diff (C, D) acc dtype, per-class Σ diff² (C,), counts)."""
    n, d = x.shape
    acc_tl, acc_torch = acc_dtypes(x.dtype)
    perm, offsets, counts = sort_by_label(labels, num_classes)
    num_dblocks = triton.cdiv(d, BLOCK_D)
    grid = (num_classes, num_dblocks)
    if ref is None:
        means = torch.empty((num_classes, d), device=x.device, dtype=x.dtype)
        _segment_mean_kernel[grid](x, perm, offsets, means, means, counts, means, d, num_dblocks, HAS_REF=False,
                                   BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, ACC_DTYPE=acc_tl)
        return means, counts
    diff = torch.empty((num_classes, d), device=x.device, dtype=acc_torch)
    partial = torch.empty((num_classes, num_dblocks), device=x.device, dtype=acc_torch)
    _segment_mean_kernel[grid](x, perm, offsets, diff, ref.contiguous(), ref_counts.contiguous(), partial, d,
                               num_dblocks, HAS_REF=True, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, ACC_DTYPE=acc_tl)
    return diff, partial.sum(1), counts


def gather_scale(g: torch.Tensor, coef: torch.Tensor, labels: torch.Tensor, out_dtype: torch.dtype):
    """out[i] = coef[labels[i]] · g[labels[i]] for g (C, D), coef (C,)."""
    n = labels.shape[0]
    d = g.shape[1]
    acc_tl, _ = acc_dtypes(out_dtype)
    out = torch.empty((n, d), device=g.device, dtype=out_dtype)
    grid = (triton.cdiv(n, BLOCK_N * 4), triton.cdiv(d, BLOCK_D))
    _gather_scale_kernel[grid](g.contiguous(), coef.contiguous(), labels, out, n, d,
                               BLOCK_N=BLOCK_N * 4, BLOCK_D=BLOCK_D, ACC_DTYPE=acc_tl)
    return out
