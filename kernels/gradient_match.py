"""Triton kernels for gradient_match: multi-tensor apply over all tensors and all groups.

Every (per-group) gradient tensor is cut into segments: for metric "ours" a segment is a slice of
at most SEG columns of one DC row; for "mse"/"cos" a slice of the flattened tensor. A segment
table (tensor, offset, length, row) — the same for every group, cached per shape signature — and a
table of data addresses (int64, cast to pointers inside the kernel) let ONE grid (segments ×
groups) cover every tensor and group:

forward  ONE launch, ``_partials_kernel`` (grid segments × groups): each program writes <r,s>, ‖r‖²,
         ‖s‖² (or Σ(s−r)² for mse) of its segment, then bumps its group's arrival counter (an
         acq_rel atomic). The program that arrives last folds the group in its epilogue: the
         segments of each row in parallel across its lanes (ours) or all segments of the group
         (cos/mse), in a fixed order; it writes the coefficients A, B of the closed-form gradient
         and the group's distance (reduction "none"), or stores the distance in a small workspace
         and bumps a second counter: the last group to finish sums the G distances in the order
         g = 0..G−1 (reduction "sum"). Every sum has a fixed order, so results are bitwise equal
         across calls whatever order the programs run in. The folders put the counters back to 0
         (``_common.arrival_counters``: reused per stream, no fill launch).
backward ``_backward_kernel``: one grid over the same table writes go·(A·s − B·r) per segment
         (rank-1 tensors under "ours" get zeros).
Accumulation in fp32 (fp64 for fp64 inputs).

Vector loads: the pointers come from an int64 table, so Triton knows nothing of their alignment
and would emit scalar loads. When the host sees every address 16-byte aligned and every column
count a multiple of VEC = 16 bytes / element size (so every segment start, length and group stride
is), the kernels are launched with ALIGNED=True, which states that alignment to the compiler
(``tl.multiple_of`` on the segment pointers and lengths): 128-bit loads. Otherwise (ALIGNED=False)
each program checks its own segment at run time and takes the hinted loop when the segment is
aligned, the plain one when not (DC's ConvNet: the 27-column first layer is read element by
element, the other layers in vectors). The hints sit only on values computed inside the checked
branch: a hint is an attribute of the operation that defines a value, valid at every use.
"""
from __future__ import annotations

import array
import collections
import functools
import math
import struct
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from ._common import acc_dtypes, arrival_counters, last_to_arrive

SEG = 8192          # columns per segment: long rows (ResNet 512 × 4608) are split, the fold re-joins them
MAX_BLOCK = 1024    # elements per inner iteration
_FOLD_BLOCK = 256
METRIC_CODE = {"ours": 0, "mse": 1, "cos": 2}

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
             torch.bfloat16: tl.bfloat16}


@triton.jit
def _segment(seg_ptr, num_segs, gnumel_ptr, sid, gid):
    k = tl.load(seg_ptr + sid)
    offset = tl.load(seg_ptr + num_segs + sid)
    length = tl.load(seg_ptr + 2 * num_segs + sid)
    row = tl.load(seg_ptr + 3 * num_segs + sid)
    base = gid * tl.load(gnumel_ptr + k) + offset  # int64: group stride × group index
    return k, base, length, row


@triton.jit
def _segment_ptr(addr_ptr, k, base, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    # loaded and hinted here, in the caller's branch: the hint covers only this new value
    ptr = tl.load(addr_ptr + k).to(tl.pointer_type(DTYPE)) + base
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)  # bytes: the address and base·element size were checked
    return ptr


@triton.jit
def _vector_length(length, VEC: tl.constexpr):
    """``length`` (a multiple of VEC, checked by the caller) as a new value hinted as one: masks
    ``offs < length`` are then constant over VEC lanes, whole vectors in or out. (A hint set on a
    function argument is dropped, and one on a value used elsewhere would hold there too.)"""
    return tl.multiple_of(length // VEC * VEC, VEC)


@triton.jit
def _aligned_at(addr_ptr, k, base, VEC: tl.constexpr):
    """Whether tensor k's data address plus ``base`` elements is 16-byte aligned (VEC elements = 16 B)."""
    return (tl.load(addr_ptr + k) + base * (16 // VEC)) % 16 == 0


@triton.jit
def _partials_kernel(addr_ptr, num_tensors, seg_ptr, num_segs, gnumel_ptr, partial_ptr, num_groups,
                     row_ptr, num_rows, max_row_segs, loss_ptr, coef_ptr, cnt_ptr,
                     METRIC: tl.constexpr, SUM: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr,
                     BLOCK: tl.constexpr, FOLD_BLOCK: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    sid = tl.program_id(0)
    gid = tl.program_id(1)
    k, base, length, row = _segment(seg_ptr, num_segs, gnumel_ptr, sid, gid)
    length = tl.where(row >= 0, length, 0)  # rank-1 tensors under "ours": no contribution
    if ALIGNED:  # the host checked every segment
        dot, nr, ns = _segment_sums(_segment_ptr(addr_ptr, k, base, DTYPE, True),
                                    _segment_ptr(addr_ptr, num_tensors + k, base, DTYPE, True),
                                    _vector_length(length, VEC), METRIC, ACC, BLOCK)
    elif (_aligned_at(addr_ptr, k, base, VEC) & _aligned_at(addr_ptr, num_tensors + k, base, VEC)
          & (length % VEC == 0)):
        dot, nr, ns = _segment_sums(_segment_ptr(addr_ptr, k, base, DTYPE, True),
                                    _segment_ptr(addr_ptr, num_tensors + k, base, DTYPE, True),
                                    _vector_length(length, VEC), METRIC, ACC, BLOCK)
    else:
        dot, nr, ns = _segment_sums(_segment_ptr(addr_ptr, k, base, DTYPE, False),
                                    _segment_ptr(addr_ptr, num_tensors + k, base, DTYPE, False),
                                    length, METRIC, ACC, BLOCK)
    out = partial_ptr + gid * num_segs + sid
    plane = num_groups * num_segs
    tl.store(out, tl.sum(dot, axis=0))
    if METRIC != 1:
        tl.store(out + plane, tl.sum(nr, axis=0))
        tl.store(out + 2 * plane, tl.sum(ns, axis=0))
    if last_to_arrive(cnt_ptr + gid, num_segs):  # every segment of group gid is written: fold it here
        _fold_group(partial_ptr, num_segs, num_groups, gid, row_ptr, num_rows, max_row_segs, loss_ptr, coef_ptr,
                    cnt_ptr, addr_ptr + 2 * num_tensors, METRIC, SUM, ACC, FOLD_BLOCK)


@triton.jit
def _segment_sums(syn, real, length, METRIC: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Lane-wise <r,s>, ‖r‖², ‖s‖² (or Σ(s−r)² in the first) over ``length`` elements."""
    dot = tl.zeros((BLOCK,), dtype=ACC)
    nr = tl.zeros((BLOCK,), dtype=ACC)
    ns = tl.zeros((BLOCK,), dtype=ACC)
    for c in range(0, length, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        mask = offs < length
        s = tl.load(syn + offs, mask=mask, other=0.0).to(ACC)
        r = tl.load(real + offs, mask=mask, other=0.0).to(ACC)
        if METRIC == 1:
            dot += (s - r) * (s - r)
        else:
            dot += s * r
            nr += r * r
            ns += s * s
    return dot, nr, ns


@triton.jit
def _cosine_terms(dot, nr, ns, eps):
    """(1 − dot/D, A, B) with D = ‖r‖‖s‖ + eps and d/ds = A·s − B·r (A = 0 where s = 0, as autograd)."""
    norm_r = tl.sqrt(nr)
    norm_s = tl.sqrt(ns)
    den = norm_r * norm_s + eps
    term = 1.0 - dot / den
    coef_b = 1.0 / den
    # grouped as (dot/D)·(‖r‖/‖s‖)/D: D² alone overflows fp32 for gradients of magnitude ~1e10
    coef_a = tl.where(norm_s > 0, (dot / den) * (norm_r / tl.where(norm_s > 0, norm_s, 1.0)) / den, 0.0)
    return term, coef_a, coef_b


@triton.jit
def _fold_group(partial_ptr, num_segs, num_groups, g, row_ptr, num_rows, max_row_segs, loss_ptr, coef_ptr, cnt_ptr,
                eps_ptr, METRIC: tl.constexpr, SUM: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """Folds group g's partials (written by other programs: read with .cg, past L1) into its
    coefficients and distance, in the fixed order of the former one-program fold."""
    # eps travels as float64 bits in the address table: a float kernel argument would be rounded to fp32
    eps = tl.load(eps_ptr).to(tl.float64, bitcast=True).to(ACC)
    plane = num_groups * num_segs
    coef_plane = num_groups * num_rows
    lanes = tl.arange(0, BLOCK)
    group_partials = partial_ptr + g * num_segs
    if METRIC == 0:  # lanes = rows: each lane re-joins its row's segments in order
        acc = tl.zeros((BLOCK,), dtype=ACC)
        for r0 in range(0, num_rows, BLOCK):
            rows = r0 + lanes
            rmask = rows < num_rows
            first = tl.load(row_ptr + rows, mask=rmask, other=0)
            count = tl.load(row_ptr + num_rows + rows, mask=rmask, other=0)
            dot = tl.zeros((BLOCK,), dtype=ACC)
            nr = tl.zeros((BLOCK,), dtype=ACC)
            ns = tl.zeros((BLOCK,), dtype=ACC)
            for j in range(0, max_row_segs):
                m = rmask & (j < count)
                dot += tl.load(group_partials + first + j, mask=m, other=0.0, cache_modifier=".cg")
                nr += tl.load(group_partials + plane + first + j, mask=m, other=0.0, cache_modifier=".cg")
                ns += tl.load(group_partials + 2 * plane + first + j, mask=m, other=0.0, cache_modifier=".cg")
            term, coef_a, coef_b = _cosine_terms(dot, nr, ns, eps)
            acc += tl.where(rmask, term, 0.0)
            tl.store(coef_ptr + g * num_rows + rows, coef_a, mask=rmask)
            tl.store(coef_ptr + coef_plane + g * num_rows + rows, coef_b, mask=rmask)
        group_loss = tl.sum(acc, axis=0)
    else:  # lanes = segments of the group
        dot = tl.zeros((BLOCK,), dtype=ACC)
        nr = tl.zeros((BLOCK,), dtype=ACC)
        ns = tl.zeros((BLOCK,), dtype=ACC)
        for s0 in range(0, num_segs, BLOCK):
            offs = s0 + lanes
            m = offs < num_segs
            dot += tl.load(group_partials + offs, mask=m, other=0.0, cache_modifier=".cg")
            if METRIC == 2:
                nr += tl.load(group_partials + plane + offs, mask=m, other=0.0, cache_modifier=".cg")
                ns += tl.load(group_partials + 2 * plane + offs, mask=m, other=0.0, cache_modifier=".cg")
        if METRIC == 1:
            group_loss = tl.sum(dot, axis=0)
            coef_a = tl.full((), 2.0, ACC)
            coef_b = coef_a
        else:
            group_loss, coef_a, coef_b = _cosine_terms(tl.sum(dot, axis=0), tl.sum(nr, axis=0),
                                                       tl.sum(ns, axis=0), eps)
        tl.store(coef_ptr + g, coef_a)  # coefs is [2, G, 1] here
        tl.store(coef_ptr + num_groups + g, coef_b)
    if SUM:
        _sum_groups(partial_ptr + (1 if METRIC == 1 else 3) * plane, num_groups, g, group_loss, loss_ptr,
                    cnt_ptr + num_groups, ACC)
    else:
        tl.store(loss_ptr + g, group_loss.to(loss_ptr.dtype.element_ty))


@triton.jit
def _sum_groups(ws_ptr, num_groups, g, group_loss, loss_ptr, cnt_ptr, ACC: tl.constexpr):
    """Second level of reduction "sum": the last group folder adds the G distances in order 0..G−1."""
    tl.store(ws_ptr + g, group_loss)
    if last_to_arrive(cnt_ptr, num_groups):
        total = tl.zeros((), dtype=ACC)  # 0 + d0 + d1 + …: the former fold's order, bit for bit
        for h in range(0, num_groups):
            total += tl.load(ws_ptr + h, cache_modifier=".cg")
        tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))


@triton.jit
def _backward_kernel(grad_ptr, grad_stride, addr_ptr, num_tensors, out_addr_ptr, seg_ptr, num_segs, gnumel_ptr,
                     coef_ptr, num_rows, num_groups,
                     DTYPE: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
                     VEC: tl.constexpr):
    sid = tl.program_id(0)
    gid = tl.program_id(1)
    k, base, length, row = _segment(seg_ptr, num_segs, gnumel_ptr, sid, gid)
    active = row >= 0
    safe_row = tl.where(active, row, 0)
    go = tl.load(grad_ptr + gid * grad_stride).to(ACC)
    coef_a = tl.where(active, go * tl.load(coef_ptr + gid * num_rows + safe_row), 0.0)
    coef_b = tl.where(active, go * tl.load(coef_ptr + num_groups * num_rows + gid * num_rows + safe_row), 0.0)
    read_length = tl.where(active, length, 0)  # rank-1 tensors under "ours": write zeros, read nothing
    if ALIGNED:  # the host checked every segment
        _segment_update(_segment_ptr(addr_ptr, k, base, DTYPE, True),
                        _segment_ptr(addr_ptr, num_tensors + k, base, DTYPE, True),
                        _segment_ptr(out_addr_ptr, k, base, DTYPE, True), _vector_length(length, VEC),
                        _vector_length(read_length, VEC), coef_a, coef_b, DTYPE, ACC, BLOCK)
    elif (_aligned_at(addr_ptr, k, base, VEC) & _aligned_at(addr_ptr, num_tensors + k, base, VEC)
          & _aligned_at(out_addr_ptr, k, base, VEC) & (length % VEC == 0)):
        _segment_update(_segment_ptr(addr_ptr, k, base, DTYPE, True),
                        _segment_ptr(addr_ptr, num_tensors + k, base, DTYPE, True),
                        _segment_ptr(out_addr_ptr, k, base, DTYPE, True), _vector_length(length, VEC),
                        _vector_length(read_length, VEC), coef_a, coef_b, DTYPE, ACC, BLOCK)
    else:
        _segment_update(_segment_ptr(addr_ptr, k, base, DTYPE, False),
                        _segment_ptr(addr_ptr, num_tensors + k, base, DTYPE, False),
                        _segment_ptr(out_addr_ptr, k, base, DTYPE, False), length, read_length, coef_a, coef_b,
                        DTYPE, ACC, BLOCK)


@triton.jit
def _segment_update(syn, real, out, length, read_length, coef_a, coef_b, DTYPE: tl.constexpr, ACC: tl.constexpr,
                    BLOCK: tl.constexpr):
    """out = coef_a·s − coef_b·r over ``length`` elements, reading the first ``read_length``."""
    for c in range(0, length, BLOCK):
        offs = c + tl.arange(0, BLOCK)
        mask = offs < length
        s = tl.load(syn + offs, mask=offs < read_length, other=0.0).to(ACC)
        r = tl.load(real + offs, mask=offs < read_length, other=0.0).to(ACC)
        tl.store(out + offs, (coef_a * s - coef_b * r).to(DTYPE), mask=mask)


# --- host side -------------------------------------------------------------------------------

def _rows_cols(shape):
    from ddfast.ops.gradient_match import rows_cols

    return rows_cols(shape)


@functools.lru_cache(maxsize=128)
def _tables(shapes: Tuple[Tuple[int, ...], ...], metric: str, grouped: bool, device: str):
    """Segment table [4, S] (tensor, offset, length, row), row table [2, R] (first segment, count),
    per-group element counts [K], max segments of one row, longest segment, groups, and the gcd of
    every column count (it divides every segment offset, length and group stride: SEG is a
    multiple of any vector width)."""
    groups = shapes[0][0] if grouped else 1
    segs, row_first, row_count, gnumel = [], [], [], []
    num_rows = 0
    unit = SEG
    for k, full in enumerate(shapes):
        shape = full[1:] if grouped else full
        numel = math.prod(shape)
        gnumel.append(numel)
        rc = _rows_cols(shape) if metric == "ours" else (1, numel)
        rows, cols = rc if rc is not None else (1, numel)
        unit = math.gcd(unit, cols)
        nseg = -(-cols // SEG)
        i = torch.arange(rows, dtype=torch.int64).repeat_interleave(nseg)
        j = torch.arange(nseg, dtype=torch.int64).repeat(rows)
        offset = i * cols + j * SEG
        length = torch.clamp(cols - j * SEG, max=SEG)
        if metric != "ours":
            row = torch.zeros_like(i)
        elif rc is None:
            row = torch.full_like(i, -1)
        else:
            first = sum(int(s.shape[1]) for s in segs)
            row_first.append(first + torch.arange(rows, dtype=torch.int64) * nseg)
            row_count.append(torch.full((rows,), nseg, dtype=torch.int64))
            row = num_rows + i
            num_rows += rows
        segs.append(torch.stack([torch.full_like(i, k), offset, length, row]))
    seg = torch.cat(segs, dim=1)
    if row_first:
        rows_t = torch.stack([torch.cat(row_first), torch.cat(row_count)])
        max_row_segs = int(rows_t[1].max())
    else:
        rows_t = torch.zeros((2, 0), dtype=torch.int64)
        max_row_segs = 0
    block = min(MAX_BLOCK, triton.next_power_of_2(int(seg[2].max())))
    dev = torch.device(device)
    return (seg.contiguous().to(dev), rows_t.contiguous().to(dev), torch.tensor(gnumel, dtype=torch.int64).to(dev),
            max(num_rows, 1) if metric == "ours" else 1, max_row_segs, block, groups, unit)


_ADDRESS_CACHE_SIZE = 8
_address_cache: "collections.OrderedDict[tuple, Tuple[torch.Tensor, bool]]" = collections.OrderedDict()
_captured_sources: List[torch.Tensor] = []  # pinned sources of copies recorded into CUDA graphs


def _addresses(*lists: List[torch.Tensor], device, extra=()) -> Tuple[torch.Tensor, bool]:
    """(the data addresses (and ``extra`` int64 words) as an int64 tensor on ``device``, whether every
    data address is 16-byte aligned), with no host sync: a table seen recently (same addresses: a
    loop that reuses its buffers) is reused; a new one is written into pinned host memory and copied
    asynchronously (on CUDA), never a pageable copy."""
    pointers = tuple(t.data_ptr() for lst in lists for t in lst)
    values = pointers + tuple(extra)
    device = torch.device(device)
    key = (device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0, values)
    cached = _address_cache.get(key)
    if cached is not None:
        _address_cache.move_to_end(key)
        return cached
    host = torch.frombuffer(array.array("q", values), dtype=torch.int64)  # a view of the Python array
    if device.type == "cuda":
        pinned = torch.empty(len(values), dtype=torch.int64, pin_memory=True)
        pinned.copy_(host)
        table = pinned.to(device, non_blocking=True)  # the host allocator keeps `pinned` until the copy ran
        if torch.cuda.is_current_stream_capturing():
            # a graph replays this copy from `pinned`: its host block must never be handed out again
            # (whatever this torch's host allocator does under capture); a few hundred bytes per capture
            _captured_sources.append(pinned)
    else:
        table = host.clone()
    entry = (table, all(p % 16 == 0 for p in pointers))
    _address_cache[key] = entry
    if len(_address_cache) > _ADDRESS_CACHE_SIZE:
        _address_cache.popitem(last=False)
    return entry


def vector_path(dtype: torch.dtype, unit: int, aligned: bool) -> Tuple[bool, int]:
    """(ALIGNED, VEC) of a launch: VEC elements make 16 bytes; the vector path needs 16-byte aligned
    addresses and every column count a multiple of VEC (``unit``: their gcd, from ``_tables``)."""
    vec = 16 // dtype.itemsize
    return aligned and unit % vec == 0, vec


def _float64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def gradient_match_forward(g_syn: List[torch.Tensor], g_real: List[torch.Tensor], metric: str, eps: float,
                           grouped: bool, reduction: str):
    """(loss: () or (G,) in the input dtype, coefs [2, G, R] in the accumulation dtype); contiguous inputs."""
    s0 = g_syn[0]
    shapes = tuple(tuple(s.shape) for s in g_syn)
    seg, rows, gnumel, num_rows, max_row_segs, block, groups, unit = _tables(shapes, metric, grouped,
                                                                            str(s0.device))
    acc_tl, acc_torch = acc_dtypes(s0.dtype)
    num_segs = seg.shape[1]
    code = METRIC_CODE[metric]
    # the partial planes, then G slots for the group distances of reduction "sum"
    partials = torch.empty(((1 if code == 1 else 3) * num_segs + 1) * groups, device=s0.device, dtype=acc_torch)
    coefs = torch.empty((2, groups, num_rows), device=s0.device, dtype=acc_torch)
    loss = torch.empty(() if reduction == "sum" else (groups,), device=s0.device, dtype=s0.dtype)
    addr, aligned = _addresses(g_syn, g_real, device=s0.device, extra=(_float64_bits(eps),))
    aligned, vec = vector_path(s0.dtype, unit, aligned)
    counters = arrival_counters(groups + 1, s0.device)  # one per group, one for the sum over groups
    _partials_kernel[(num_segs, groups)](addr, len(g_syn), seg, num_segs, gnumel, partials, groups,
                                         rows, rows.shape[1], max_row_segs, loss, coefs, counters,
                                         METRIC=code, SUM=reduction == "sum", DTYPE=_TL_DTYPE[s0.dtype], ACC=acc_tl,
                                         BLOCK=block, FOLD_BLOCK=_FOLD_BLOCK, ALIGNED=aligned, VEC=vec)
    return loss, coefs


def gradient_match_backward(grad: torch.Tensor, g_syn: List[torch.Tensor], g_real: List[torch.Tensor],
                            coefs: torch.Tensor, metric: str, grouped: bool) -> List[torch.Tensor]:
    s0 = g_syn[0]
    shapes = tuple(tuple(s.shape) for s in g_syn)
    seg, _rows, gnumel, num_rows, _mrs, block, groups, unit = _tables(shapes, metric, grouped, str(s0.device))
    acc_tl, _ = acc_dtypes(s0.dtype)
    grads = [torch.empty_like(s, memory_format=torch.contiguous_format) for s in g_syn]
    grad = grad.contiguous()
    addr, aligned = _addresses(g_syn, g_real, grads, device=s0.device)  # one host-to-device copy for all three
    aligned, vec = vector_path(s0.dtype, unit, aligned)
    out_addr = addr[2 * len(g_syn):]
    _backward_kernel[(seg.shape[1], groups)](grad, 1 if grad.dim() else 0, addr, len(g_syn), out_addr, seg,
                                             seg.shape[1], gnumel, coefs.contiguous(), num_rows, groups,
                                             DTYPE=_TL_DTYPE[s0.dtype], ACC=acc_tl, BLOCK=block,
                                             ALIGNED=aligned, VEC=vec)
    return grads
