"""DistributionMatcher — DM's whole synthetic-data step as a few batched calls (SPEC 3.3).

DatasetCondensation ``main_DM.py`` loops over classes: augment the class's real and synthetic
images with one DSA seed, embed them, add ``Σ (mean(out_real) − mean(out_syn))²``. Here:

1. DSA (optional): one grouped ``ddfast.dsa_augment`` call per side, group = class, the class's
   seed shared by its real and synthetic images (as the reference's per-class calls).
2. one forward of all real images (under ``no_grad``) and one of all synthetic images.
3. ``ddfast.class_mean_loss`` (or ``ddfast.mmd`` per class when ``loss="mmd"``).

For embeddings that treat samples independently (instance/group norm ConvNets, DM's default;
no BatchNorm in train mode) batching is exact, so loss and image gradients equal the loop's.
With a BatchNorm that normalises with batch statistics (train mode, or no running statistics:
DM's ConvNetBN branch) the one forward per side is exactly DM's ConvNetBN step, which embeds
all real images of all classes in one batch. ``real_chunk_size`` keeps those whole-batch
statistics (see ``_WholeBatchNorms``).
"""
from __future__ import annotations

import time
from typing import Callable, List, Optional, Sequence, Union

import torch
from torch import nn

from .._checks import (acc_dtype, check_choice, check_float_tensor, check_labels, check_num_classes, check_same_device,
                       infer_num_classes)
from .class_mean_loss import class_mean_loss
from .. import _backend
from .class_means import OP as CLASS_MEANS, class_means_impl
from .dsa import dsa_augment
from ._cuda_graph import GraphedStep, check_cuda_graph, label_key, module_key, tensor_key
from ._real_precision import check_real_precision, real_side
from .mmd import mmd
from .norm_relu_pool import embed_plan, fusion_available, plan_key, run_plan


def dm_clock_seeds(num_classes: int) -> list:
    """DM's seeds: ``int(time.time() * 1000) % 100000`` taken once per class."""
    return [int(time.time() * 1000) % 100000 for _ in range(num_classes)]


def dm_reference_loop(embed: Callable, x_real: torch.Tensor, y_real: torch.Tensor, x_syn: torch.Tensor,
                      y_syn: torch.Tensor, num_classes: int, augment: Optional[Callable] = None,
                      seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
    """DM's class loop (main_DM.py, ConvNet branch); ``augment(images, seed)`` stands for DiffAugment."""
    loss = torch.zeros((), dtype=x_syn.dtype, device=x_syn.device)
    for c in range(num_classes):
        img_real, img_syn = x_real[y_real == c], x_syn[y_syn == c]
        if not len(img_real) or not len(img_syn):
            continue
        if augment is not None:
            img_real = augment(img_real, seeds[c])
            img_syn = augment(img_syn, seeds[c])
        output_real = embed(img_real).detach()
        output_syn = embed(img_syn)
        loss = loss + torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
    return loss


class DistributionMatcher:
    """``matcher(x_real, y_real, x_syn, y_syn, seeds=None)`` → DM's loss, differentiable w.r.t. x_syn.

    embed: the embedding network (e.g. ``net.embed`` of DC's ConvNet); its parameters are used as
    they are (DM freezes them). num_classes: default ``max label + 1`` per call.
    dsa_strategy: DSA strategy string (e.g. ``'color_crop_cutout_flip_scale_rotate'``); None or ""
    turns DSA off. dsa_param: a ``ParamDiffAug``; align_corners as ``dsa_augment``. dsa_rng: the
    ``rng`` of ``dsa_augment``: "device" (default: Philox draws on the device, no host sync, not
    DM's stream) or "reference" (DM's draws per class, exactly, as ``compat.dc.dm_class_loop_loss``).
    seed_fn: ``seed_fn(num_classes)`` → one seed per class when a call gives no ``seeds`` (default:
    DM's clock-based seeds; pass your own for reproducible runs).
    loss: "mean" (DM/CAFE's class-mean loss) or "mmd" (``ddfast.mmd`` per class, ``mmd_kwargs``).
    real_chunk_size: with loss "mean", embed the real images this many at a time and keep only
    their per-class feature sums, so activation memory no longer grows with the real batch (e.g.
    CIFAR-100 × 256 real images); the loss is unchanged up to fp rounding. "auto" (default) chunks
    real batches above ``AUTO_CHUNK_ELEMENTS`` input elements (2^23 on a GPU, 2^19 on the CPU,
    where smaller chunks measured faster) when no BatchNorm uses batch statistics
    (``chunk_size``); on the CPU the synthetic side is also embedded in pieces
    (``syn_chunk_size``); None: always one forward. When ``embed`` is an ``nn.Module`` (or a
    bound method of one) with BatchNorm layers that use batch statistics, those statistics are
    first computed over the whole real batch, chunk by chunk, one pass per such layer (so the real
    side costs about (layers + 1) / 2 forwards more), and the running statistics are updated once,
    as one forward of the whole batch updates them. An embedding given as a plain function is
    assumed to treat samples independently.
    cuda_graph: on CUDA, capture the embeddings and the loss (forward and backward to the
    augmented synthetic images) once per static configuration and replay them from a CUDA graph;
    DSA stays eager, before it (its seeds come from the host). CPU or a failed capture: eager, one
    warning. Not yet run on a GPU (``tests/test_cuda_graph.py``, skipped without one).
    fuse_real: (default True) on CUDA with Triton (backend "auto" or "triton"), when ``embed`` is an
    ``nn.Sequential`` (DC's ConvNet features, nested Sequentials flattened), run each instance norm →
    ReLU (→ 2×2 average pool) block as one ``ddfast.norm_relu_pool`` kernel: one read of the conv
    output instead of ATen's ~5 full-size passes; on the synthetic side its backward too (one pass).
    fp32 statistics, the loss equal up to rounding. Norm parameters that require grad take the
    modules' math; the real side under ``real_precision`` (autocast) keeps the modules. False: the
    modules on both sides.
    real_precision: None (default: the inputs' precision), "bf16" or "fp16": the real images are
    embedded under ``torch.autocast`` in that type (fp32 inputs only) and their features returned in
    the synthetic side's dtype; the synthetic side stays in full precision. Measured on CPU (DM's
    ConvNet-3 w32 embedding, 4 classes, 16 real + 2 synthetic images per class, 16 px, fp32,
    random images, ``tests/test_real_precision.py``): the loss changes by relative 6.3e-4 (bf16) or
    1.0e-4 (fp16), the image gradient by relative L2 4.0e-3 (bf16) or 5.0e-4 (fp16).
    """

    def __init__(self, embed: Callable, num_classes: Optional[int] = None, *, dsa_strategy: Optional[str] = None,
                 dsa_param=None, align_corners: bool = False, seed_fn: Optional[Callable[[int], Sequence[int]]] = None,
                 loss: str = "mean", mmd_kwargs: Optional[dict] = None, backend: str = "auto",
                 real_chunk_size: Union[int, str, None] = "auto", dsa_rng: str = "device",
                 real_precision: Optional[str] = None,
                 cuda_graph: bool = False, fuse_real: bool = True):
        if not callable(embed):
            raise TypeError(f"embed must be callable (an nn.Module or function), got {type(embed).__name__}")
        self.embed = embed
        self.num_classes = None if num_classes is None else check_num_classes(num_classes)
        self.dsa_strategy = dsa_strategy or None
        self.dsa_param = dsa_param
        self.align_corners = align_corners
        self.dsa_rng = check_choice("dsa_rng", dsa_rng, ("reference", "device", "fast"))
        self.seed_fn = seed_fn or dm_clock_seeds
        self.loss = check_choice("loss", loss, ("mean", "mmd"))
        self.mmd_kwargs = dict(mmd_kwargs or {})
        self.backend = backend
        if real_chunk_size != "auto" and real_chunk_size is not None and (
                isinstance(real_chunk_size, bool) or not isinstance(real_chunk_size, int) or real_chunk_size <= 0):
            raise ValueError(f"real_chunk_size must be a positive int, 'auto' or None, got {real_chunk_size!r}")
        if isinstance(real_chunk_size, int) and self.loss != "mean":
            raise ValueError("real_chunk_size works with loss='mean' only (mmd needs every real feature)")
        self.real_chunk_size = real_chunk_size
        self.real_precision = check_real_precision(real_precision)
        self.cuda_graph = check_cuda_graph(cuda_graph)
        self._graph = GraphedStep("DistributionMatcher")
        self._ids: dict = {}
        if not isinstance(fuse_real, bool):
            raise TypeError(f"fuse_real must be a bool, got {type(fuse_real).__name__}")
        self.fuse_real = fuse_real
        self._plan = None  # (plan_key, embed_plan) of the real side's fused embedding

    def _augment(self, x: torch.Tensor, y: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
        return dsa_augment(x, y, self.dsa_strategy, seeds, align_corners=self.align_corners, param=self.dsa_param,
                           rng=self.dsa_rng)

    def __call__(self, x_real: torch.Tensor, y_real: torch.Tensor, x_syn: torch.Tensor, y_syn: torch.Tensor,
                 seeds: Optional[Sequence[int]] = None) -> torch.Tensor:
        check_float_tensor("x_real", x_real, min_dim=1)
        check_float_tensor("x_syn", x_syn, min_dim=1)
        check_same_device(x_real=x_real, y_real=y_real, x_syn=x_syn, y_syn=y_syn)
        check_labels("y_real", y_real, x_real.shape[0], self.num_classes)
        check_labels("y_syn", y_syn, x_syn.shape[0], self.num_classes)
        num_classes = self.num_classes or infer_num_classes(y_real, y_syn)
        if self.dsa_strategy is not None:
            seeds = list(self.seed_fn(num_classes) if seeds is None else seeds)
            if len(seeds) < num_classes:
                raise ValueError(f"seeds must give one seed per class ({num_classes}), got {len(seeds)}")
            with torch.no_grad():
                x_real = self._augment(x_real, y_real, seeds)
            x_syn = self._augment(x_syn, y_syn, seeds)
        if self.cuda_graph:  # DSA (host seeds) stays eager; the embeddings and the loss are replayed
            key = (tensor_key(x_real, x_syn), label_key(y_real, y_syn), module_key(self.embed), num_classes)
            return self._graph(lambda xr, xs: self._embed_and_match(xr, y_real, xs, y_syn, num_classes), key,
                               (x_real.detach(), x_syn))
        return self._embed_and_match(x_real, y_real, x_syn, y_syn, num_classes)

    def chunk_size(self, x_real: torch.Tensor) -> Optional[int]:
        """Real images per forward, or None for one forward of them all. "auto" chunks when the real
        batch holds more than AUTO_CHUNK_ELEMENTS input elements (AUTO_CHUNK_ELEMENTS_CPU on the
        CPU, where smaller chunks run faster), the loss is "mean", and ``embed``
        is an ``nn.Module`` (or a bound method of one) none of whose BatchNorms uses batch
        statistics (there chunking costs extra forwards; a plain function's layers are unknown).
        The chunks are equal to within one image."""
        size = self.real_chunk_size
        if size != "auto":
            return size if size is not None and x_real.shape[0] > size else None
        on_cpu = x_real.device.type == "cpu"
        limit = min(AUTO_CHUNK_ELEMENTS, AUTO_CHUNK_ELEMENTS_CPU) if on_cpu else AUTO_CHUNK_ELEMENTS
        return self._equal_chunks(x_real, limit) if self.loss == "mean" else None

    def syn_chunk_size(self, x_syn: torch.Tensor) -> Optional[int]:
        """Synthetic images per forward on the CPU, where batches above AUTO_CHUNK_ELEMENTS_CPU_SYN
        input elements run faster in pieces (their graphs are kept, so the gradient is the one of a
        single forward up to rounding); None elsewhere, or with ``real_chunk_size=None``."""
        if x_syn.device.type != "cpu" or self.real_chunk_size != "auto":
            return None
        return self._equal_chunks(x_syn, min(AUTO_CHUNK_ELEMENTS, AUTO_CHUNK_ELEMENTS_CPU_SYN))

    def _equal_chunks(self, x: torch.Tensor, limit: int) -> Optional[int]:
        """Images per chunk (equal to within one) when x holds more than ``limit`` input elements
        and ``embed`` treats samples independently (a Module with no batch-statistic BatchNorm)."""
        cap = max(1, limit // max(1, x[:1].numel()))
        n = x.shape[0]
        if n <= cap or not _modules_of(self.embed) or batch_statistic_norms(self.embed):
            return None
        chunks = -(-n // cap)
        return -(-n // chunks)

    def _embed_and_match(self, x_real, y_real, x_syn, y_syn, num_classes):
        chunk = self.chunk_size(x_real)
        plan = self._fusion_plan(x_syn.device)
        with torch.no_grad(), real_side(x_real.device, self.real_precision):
            if chunk is not None:
                f_real, y_real = self._real_class_means(x_real, y_real, num_classes, chunk, plan)
            else:
                f_real = self._embed(x_real, True, plan)
        f_real = f_real.to(x_syn.dtype)
        syn_chunk = self.syn_chunk_size(x_syn)
        if syn_chunk is None:
            f_syn = self._embed(x_syn, False, plan)
        else:
            f_syn = torch.cat([self._embed(part, False, plan) for part in x_syn.split(syn_chunk)])
        if chunk is not None:
            f_real = _fill_absent_classes(f_real, y_real, f_syn, y_syn, num_classes, self.backend)
            y_real = self._class_ids(num_classes, y_syn.device)
        if self.loss == "mmd":
            return mmd(f_real.reshape(f_real.shape[0], -1), f_syn.reshape(f_syn.shape[0], -1), x_labels=y_real,
                             y_labels=y_syn, num_classes=num_classes, backend=self.backend, **self.mmd_kwargs)
        return class_mean_loss(f_real, y_real, f_syn, y_syn, num_classes, backend=self.backend)

    def _embed(self, x: torch.Tensor, real: bool, plan) -> torch.Tensor:
        """One side's embedding: through ``plan`` (``_fusion_plan``) when there is one, forward only
        on the real side (no_grad), forward and the first-order input gradient on the synthetic
        side (DM's loss needs no more); the real side under autocast (real_precision) keeps the
        modules."""
        if plan is not None and not (real and self.real_precision):
            return run_plan(plan, x, self.backend)
        return self.embed(x)

    def _fusion_plan(self, device: torch.device):
        """On CUDA with Triton (backend "auto" or "triton"), for an ``nn.Sequential`` embedding:
        its layers with each instance norm → ReLU → 2×2 pool block as one ``norm_relu_pool``
        (rebuilt when the modules or their hooks change); else None."""
        if not fusion_available(self.fuse_real, self.backend, device):
            return None
        key = plan_key(self.embed)
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, embed_plan(self.embed))
        return self._plan[1]

    def _class_ids(self, num_classes: int, device: torch.device) -> torch.Tensor:
        """``arange(num_classes)``, one tensor per (C, device) kept by the matcher, so the loss's
        label check reads it once, not every step."""
        key = (num_classes, device)
        ids = self._ids.get(key)
        if ids is None:
            ids = self._ids[key] = torch.arange(num_classes, device=device)
        return ids

    def _real_class_means(self, x_real: torch.Tensor, y_real: torch.Tensor, num_classes: int, chunk: int, plan):
        """Per-class mean real features of every class (0 for absent ones) and the per-class
        counts, from chunked forwards; no host sync."""
        sums, counts, shape = None, None, None
        with _WholeBatchNorms(self.embed, x_real, chunk):
            for start in range(0, x_real.shape[0], chunk):
                sums, counts, shape = self._add_chunk(x_real, y_real, start, chunk, num_classes, sums, counts, plan)
        means = sums / counts.clamp(min=1).to(sums.dtype).unsqueeze(1)
        return means.reshape((num_classes,) + tuple(shape)), counts

    def _add_chunk(self, x_real, y_real, start, chunk, num_classes, sums, counts, plan):
        """Add one chunk's per-class feature sums and counts."""
        stop = start + chunk
        f = self._embed(x_real[start:stop], True, plan)
        shape = f.shape[1:]
        f = f.reshape(f.shape[0], -1)
        acc = acc_dtype(f.dtype)
        means, n = _validated_class_means(f.to(acc), y_real[start:stop], num_classes, self.backend)
        part = means * n.to(acc).unsqueeze(1)
        sums = part if sums is None else sums + part
        counts = n if counts is None else counts + n
        return sums, counts, shape


# "auto" real_chunk_size: input elements per chunk (2730 CIFAR images; 55 at 224 px). ConvNet-3's
# first layer holds ~43x its input (128 channels for 3), so a chunk's largest activation is ~1.4 GB
# in fp32; CIFAR-100 x 256 real images in one forward peaked at 25.9 GB on an H200 (2026-11-26).
AUTO_CHUNK_ELEMENTS = 2 ** 23
# On the CPU smaller chunks are faster: DM's CIFAR-10 ipc-50 step (ConvNet-3 w128, 2560 real images,
# 2 threads) took 5.21 s in one forward of 2730-image chunks, 3.53 s with 341, 3.26 s with 170, 3.29 s
# with 85; DM's per-class loop 4.16 s (2026-11-26). 170 images: ~90 MB first-layer activations.
AUTO_CHUNK_ELEMENTS_CPU = 2 ** 19
# The synthetic side (forward kept for the backward) likewise: its 500 CIFAR images (ConvNet-3
# w128, forward + backward, 2 threads) took 1.50 s in one batch, 0.95 s in chunks of 50, 0.86 s of
# 25. 2^17 elements: 42 CIFAR images.
AUTO_CHUNK_ELEMENTS_CPU_SYN = 2 ** 17


def _validated_class_means(x2d: torch.Tensor, labels: torch.Tensor, num_classes: int, backend: str):
    """class_means of rows whose labels the matcher has already checked (slices of them are new
    tensors each call, whose range check would read them on the host: a sync, and a failed CUDA
    graph capture)."""
    which = _backend.resolve(CLASS_MEANS, backend, x2d.device)
    return class_means_impl(x2d.contiguous(), labels.to(torch.int64).contiguous(), num_classes, which)


def _fill_absent_classes(means, counts, f_syn, y_syn, num_classes, backend):
    """The chunked real side's per-class means with each class absent from the real batch set to
    the synthetic mean (detached) of that class: the term ``‖m_real − m_syn‖²`` of such a class is
    then 0 up to rounding, as class_mean_loss leaves out a class not present on both sides, and the
    loss keeps one row per class without a host sync to find the present ones."""
    flat = f_syn.detach().reshape(f_syn.shape[0], -1)
    syn_means, _ = _validated_class_means(flat.to(means.dtype), y_syn, num_classes, backend)  # empty classes: 0
    filled = torch.where((counts > 0).unsqueeze(1), means.reshape(num_classes, -1), syn_means)
    return filled.reshape(means.shape)


def _modules_of(embed) -> List[nn.Module]:
    owner = embed if isinstance(embed, nn.Module) else getattr(embed, "__self__", None)
    return list(owner.modules()) if isinstance(owner, nn.Module) else []


def batch_statistic_norms(embed) -> List[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``embed`` (a Module or a bound method of one) that normalise with the
    statistics of their batch: train mode, or no running statistics."""
    return [m for m in _modules_of(embed) if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and (m.training or m.running_mean is None)]


class _StopForward(Exception):
    pass


class _WholeBatchNorms:
    """Context in which chunked forwards of ``embed`` normalise every batch-statistic BatchNorm with
    the statistics of the whole batch ``x``, as one forward of ``x`` would.

    Pass k (layers in the order the forward reaches them) runs the chunks up to layer k, whose
    input statistics are merged over the chunks (float64 sums of the chunk means and of the squared
    deviations, Chan's formula); layers before k normalise with the statistics already found, in
    eval mode with them as their running statistics. Inside the context every such layer stays in
    that state; on exit the modes and buffers come back and the running statistics get the one
    momentum update a forward of the whole batch gives (unbiased variance, num_batches_tracked)."""

    def __init__(self, embed, x: torch.Tensor, chunk: int):
        self.embed, self.x, self.chunk = embed, x, chunk
        self.norms = batch_statistic_norms(embed) if x.shape[0] > chunk else []
        self.saved = []

    def __enter__(self):
        if not self.norms:
            return self
        order = self._forward_order()
        self.saved = [(m, m.training, m.running_mean, m.running_var) for m in order]
        stats = []
        try:
            for layer in order:
                stats.append(self._input_stats(layer))
                self._freeze(layer, *stats[-1][:2])
        except BaseException:
            self._restore()
            raise
        self.stats = stats
        return self

    def __exit__(self, *exc):
        if not self.norms:
            return
        saved = self.saved
        self._restore()
        if exc[0] is None:
            for (m, was_training, _, _), (mean, var, count) in zip(saved, self.stats):
                if was_training and m.track_running_stats and m.running_mean is not None:
                    _update_running_stats(m, mean, var, count)

    def _forward_order(self) -> List[nn.Module]:
        seen = []

        def note(module, _inputs):
            if module in seen:
                raise ValueError("real_chunk_size: a BatchNorm layer of the embedding is called twice in one forward; "
                                 "its whole-batch statistics cannot be computed chunk by chunk (use real_chunk_size=None)")
            seen.append(module)

        # a forward of two images finds the order; it must not move the running statistics
        buffers = [{k: b.clone() for k, b in m._buffers.items() if b is not None} for m in self.norms]
        handles = [m.register_forward_pre_hook(note) for m in self.norms]
        try:
            with torch.no_grad():
                self.embed(self.x[:2])
        finally:
            for h in handles:
                h.remove()
            with torch.no_grad():
                for m, saved in zip(self.norms, buffers):
                    for k, b in saved.items():
                        m._buffers[k].copy_(b)
        return seen

    def _input_stats(self, layer):
        """(mean, biased var, element count) per channel of the layer's input over the whole batch."""
        parts = []

        def collect(_module, inputs):
            t = inputs[0].detach().transpose(0, 1).reshape(inputs[0].shape[1], -1).double()
            mean = t.mean(1)
            parts.append((mean, ((t - mean.unsqueeze(1)) ** 2).sum(1), t.shape[1]))
            raise _StopForward

        handle = layer.register_forward_pre_hook(collect)
        try:
            with torch.no_grad():
                for start in range(0, self.x.shape[0], self.chunk):
                    try:
                        self.embed(self.x[start:start + self.chunk])
                    except _StopForward:
                        pass
        finally:
            handle.remove()
        mean, m2, count = parts[0]
        for mean_b, m2_b, count_b in parts[1:]:  # Chan et al.'s pairwise merge
            total = count + count_b
            delta = mean_b - mean
            mean = mean + delta * (count_b / total)
            m2 = m2 + m2_b + delta * delta * (count * count_b / total)
            count = total
        return mean, m2 / count, count

    @staticmethod
    def _freeze(layer, mean, var):
        dtype = layer.weight.dtype if layer.weight is not None else mean.dtype
        layer.running_mean = mean.to(dtype)
        layer.running_var = var.to(dtype)
        layer.eval()

    def _restore(self):
        for m, was_training, rm, rv in self.saved:
            m.running_mean, m.running_var = rm, rv
            m.train(was_training)
        self.saved = []


def _update_running_stats(m, mean, var, count):
    """The running-statistics update of one train-mode forward over ``count`` elements per channel."""
    with torch.no_grad():
        m.num_batches_tracked.add_(1)
        momentum = (1.0 / float(m.num_batches_tracked)) if m.momentum is None else m.momentum
        unbiased = var * (count / max(count - 1, 1))
        m.running_mean.mul_(1 - momentum).add_(mean.to(m.running_mean.dtype), alpha=momentum)
        m.running_var.mul_(1 - momentum).add_(unbiased.to(m.running_var.dtype), alpha=momentum)
