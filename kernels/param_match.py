"""Triton kernels for param_match: ||s - t||^2 / ||a - t||^2 in one pass, and its backward.

Forward: each program reduces one BLOCK-sized slice of the three vectors into two partial
sums (fp32, fp64 for fp64 inputs); the partials are folded by a single program (deterministic,
no atomics). Backward: one elementwise pass writing 2 g (s - t) / den.

Every program but the last covers a whole block: it loads (and stores) without a mask, so its
accesses are 128-bit vectors whatever n is (a mask ``offs < n`` is only known constant over 4
lanes when Triton specialises n on divisibility by 16); the last block takes the masked path.
"""
import torch
import triton
import triton.language as tl

from ._common import acc_dtypes

BLOCK = 4096
_FINISH_BLOCK = 1024


@triton.jit
def _param_match_partials_kernel(s_ptr, a_ptr, t_ptr, partial_ptr, n, num_programs,
                                 BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    if pid * BLOCK + BLOCK <= n:  # a whole block: unmasked, vectorised loads
        t = tl.load(t_ptr + offs).to(ACC_DTYPE)
        ds = tl.load(s_ptr + offs).to(ACC_DTYPE) - t
        da = tl.load(a_ptr + offs).to(ACC_DTYPE) - t
    else:
        mask = offs < n
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        ds = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE) - t
        da = tl.load(a_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE) - t
    tl.store(partial_ptr + pid, tl.sum(ds * ds, axis=0))
    tl.store(partial_ptr + num_programs + pid, tl.sum(da * da, axis=0))


@triton.jit
def _param_match_finish_kernel(partial_ptr, loss_ptr, den_ptr, num_programs,
                               BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    num = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    den = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for start in range(0, num_programs, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < num_programs
        num += tl.load(partial_ptr + offs, mask=mask, other=0.0)
        den += tl.load(partial_ptr + num_programs + offs, mask=mask, other=0.0)
    total_num = tl.sum(num, axis=0)
    total_den = tl.sum(den, axis=0)
    tl.store(loss_ptr, (total_num / total_den).to(loss_ptr.dtype.element_ty))
    tl.store(den_ptr, total_den)


@triton.jit
def _param_match_backward_kernel(g_ptr, s_ptr, t_ptr, den_ptr, out_ptr, n,
                                 BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    scale = 2.0 * tl.load(g_ptr).to(ACC_DTYPE) / tl.load(den_ptr).to(ACC_DTYPE)
    if pid * BLOCK + BLOCK <= n:  # a whole block: unmasked, vectorised loads and stores
        s = tl.load(s_ptr + offs).to(ACC_DTYPE)
        t = tl.load(t_ptr + offs).to(ACC_DTYPE)
        tl.store(out_ptr + offs, (scale * (s - t)).to(out_ptr.dtype.element_ty))
    else:
        mask = offs < n
        s = tl.load(s_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(ACC_DTYPE)
        tl.store(out_ptr + offs, (scale * (s - t)).to(out_ptr.dtype.element_ty), mask=mask)


def param_match_forward(student: torch.Tensor, start: torch.Tensor, target: torch.Tensor):
    """(loss in the input dtype, denominator in the accumulation dtype) for contiguous 1-D inputs."""
    n = student.numel()
    acc_tl, acc_torch = acc_dtypes(student.dtype)
    programs = triton.cdiv(n, BLOCK)
    partials = torch.empty(2 * programs, device=student.device, dtype=acc_torch)
    loss = torch.empty((), device=student.device, dtype=student.dtype)
    den = torch.empty((), device=student.device, dtype=acc_torch)
    _param_match_partials_kernel[(programs,)](student, start, target, partials, n, programs,
                                              BLOCK=BLOCK, ACC_DTYPE=acc_tl)
    _param_match_finish_kernel[(1,)](partials, loss, den, programs, BLOCK=_FINISH_BLOCK, ACC_DTYPE=acc_tl)
    return loss, den


def param_match_backward(grad: torch.Tensor, student: torch.Tensor, target: torch.Tensor, den: torch.Tensor):
    n = student.numel()
    acc_tl, _ = acc_dtypes(student.dtype)
    out = torch.empty_like(student)
    _param_match_backward_kernel[(triton.cdiv(n, BLOCK),)](grad.contiguous(), student, target, den, out, n,
                                                          BLOCK=BLOCK, ACC_DTYPE=acc_tl)
    return out
