"""GradientMatcher — the DatasetCondensation (DC/DSA) class loop as one batched op (SPEC 3.1).

DC's ``main.py`` computes, for every class c, the parameter gradient of the mean cross-entropy on a
real batch of class c (detached) and on the synthetic images of class c (``create_graph=True``), and
sums ``match_loss(gw_syn, gw_real)`` over classes. ``GradientMatcher`` returns the same sum, with the
same gradient w.r.t. the synthetic images, but computes all classes at once:

* ``strategy="segmented"``, the fast path for DD's ConvNet family and other layer sequences: models
  whose ``torch.fx`` trace is a chain of conv, linear, group/instance/layer norm, eval BatchNorm,
  activations, pooling and flattens (``nn.Sequential`` models, DC's ConvNet; see
  ``_segmented_grads``). One dense forward over all classes, one data-only backward, and per-class
  parameter gradients as class-segmented reductions of per-sample terms (the first-order trick:
  layer input x output gradient, summed per class). The real side needs no graph and runs in chunks
  of whole classes (``real_chunk_size`` images); the synthetic side keeps the graph for the image
  gradient.
* ``strategy="vmap"`` (any ``nn.Module``): ``torch.func.vmap`` over classes of ``torch.func.grad`` of a
  weighted cross-entropy through ``functional_call``. Classes with fewer samples are padded with zero
  images of weight 0; the others get weight ``1/n_c``, so each class's loss is exactly its CE mean.
  Under vmap every class has its own copy of the weights, so convolutions run as one class-grouped
  convolution and linear layers as one bmm — forward, backward and double backward.
* ``strategy="loop"``: the reference loop (one autograd pass per class); the fallback for modules
  that vmap cannot batch.
* ``strategy="auto"``: "segmented" when the model qualifies, else "vmap" on CUDA and "loop" on CPU.
  On CPU "segmented" is taken only while the first-layer activations of the real batch stay under
  ~6M elements: past that, dense big-batch passes fall out of cache and the per-class loop measured
  faster (2-core Xeon, ConvNet-3, loop vs segmented ms: 58 vs 33 at 0.66M elements, 147 vs 125 at
  2.6M, 174 vs 185 and 267 vs 205 at 5.2M, 299 vs 372 at 10.5M, 567 vs 960 at 21M). vmap's
  class-grouped convolutions measured slower than the loop on CPU (21M: 1190 ms). None of the
  strategies is timed on a GPU yet: ``ddfast bench --full -k dc_step`` times all three.

All per-class gradients then go to ``ddfast.gradient_match(..., grouped=True)`` in one call.

Host syncs: none after the first call with the same label tensors and shapes. The class layout (the
classes on both sides, each class's samples) is computed once per pair of label tensors, cached on
their identities and version counters (``class_layout``); the segmented plan once per model
structure (``_segmented_grads.plan_for``); under metric "ours" the segmented strategy skips rank-1
parameters (exactly 0 there): no per-class gradients and no graph through them.

Semantics kept from the reference: parameters are those of ``model.parameters()`` that require grad,
in that order (rank-1 tensors contribute 0 with metric "ours"); the real side is constant; the model
is used in its current mode. The model's parameters receive no ``.grad`` (DC zeroes them before its
network update anyway). BatchNorm: as DC's main.py does before its class loop, BatchNorm layers
found in training mode are given running statistics from a real batch (the first
``bn_images_per_class`` real images of every class, in class order, one forward in train mode) and
are then switched to eval mode — that switch persists, exactly as in DC, until ``model.train()``.
"""
from __future__ import annotations

import weakref
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_choice, check_finite, check_float_tensor, check_labels, check_same_device, \
    check_same_dtype
from ._cuda_graph import GraphedStep, check_cuda_graph, label_key, module_key, tensor_key
from ._real_precision import check_real_precision, lowered_dtype, real_side

METRICS = ("ours", "mse", "cos")
STRATEGIES = ("auto", "segmented", "vmap", "loop")


# --- the DC ConvNet family (tests and benchmarks) ------------------------------------------------

class ConvNet(nn.Module):
    """DC's ``ConvNet`` layout: ``depth`` x [conv3x3 -> norm -> act -> pool], then one linear.

    ``norm``: "instancenorm" (``GroupNorm(width, width)``, DC's default), "groupnorm"
    (``GroupNorm(4, width)``), "layernorm" (``LayerNorm([width, h, w])``), "batchnorm" or "none";
    ``act``: "relu" (default), "leakyrelu" (slope 0.01), "sigmoid"; ``pooling``: "avgpooling"
    (default), "maxpooling" (2x2, stride 2) or "none". As in DC, 1-channel inputs get padding 3 in
    the first conv (28 px MNIST becomes 32 px); parameter order equals DC's, so state dicts match.
    """

    def __init__(self, channel: int, num_classes: int, width: int = 128, depth: int = 3, norm: str = "instancenorm",
                 im_size=(32, 32), act: str = "relu", pooling: str = "avgpooling"):
        super().__init__()
        check_choice("norm", norm, ("instancenorm", "groupnorm", "layernorm", "batchnorm", "none"))
        check_choice("act", act, ("relu", "leakyrelu", "sigmoid"))
        check_choice("pooling", pooling, ("avgpooling", "maxpooling", "none"))
        h, w = (im_size, im_size) if isinstance(im_size, int) else tuple(im_size)
        layers: List[nn.Module] = []
        in_ch = channel
        for d in range(depth):
            pad = 3 if channel == 1 and d == 0 else 1
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=pad))
            h, w = h + 2 * pad - 2, w + 2 * pad - 2
            if norm == "instancenorm":
                layers.append(nn.GroupNorm(width, width, affine=True))
            elif norm == "groupnorm":
                layers.append(nn.GroupNorm(4, width, affine=True))
            elif norm == "layernorm":
                layers.append(nn.LayerNorm([width, h, w], elementwise_affine=True))
            elif norm == "batchnorm":
                layers.append(nn.BatchNorm2d(width, affine=True))
            layers.append({"relu": lambda: nn.ReLU(inplace=True), "leakyrelu": lambda: nn.LeakyReLU(0.01),
                           "sigmoid": nn.Sigmoid}[act]())
            if pooling != "none":
                layers.append(nn.AvgPool2d(2, 2) if pooling == "avgpooling" else nn.MaxPool2d(2, 2))
                h, w = h // 2, w // 2
            in_ch = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


# --- the reference: DC's class loop, written as DC writes it -------------------------------------

def match_loss_reference(gw_syn: Sequence[torch.Tensor], gw_real: Sequence[torch.Tensor], metric: str = "ours",
                         eps: float = 1e-6) -> torch.Tensor:
    """DC ``utils.match_loss`` (with ``distance_wb``) for one class: the oracle of the tests."""
    if metric == "ours":
        dis = gw_syn[0].new_zeros(())
        for gs, gr in zip(gw_syn, gw_real):
            if gr.dim() == 1:  # biases, norm affine parameters: DC returns 0
                continue
            if gr.dim() in (3, 4):  # DC reshapes these two ranks only; others reduce over the last axis
                gr, gs = gr.reshape(gr.shape[0], -1), gs.reshape(gs.shape[0], -1)
            dis = dis + torch.sum(1 - torch.sum(gr * gs, dim=-1) / (gr.norm(dim=-1) * gs.norm(dim=-1) + eps))
        return dis
    real = torch.cat([g.reshape(-1) for g in gw_real])
    syn = torch.cat([g.reshape(-1) for g in gw_syn])
    if metric == "mse":
        return torch.sum((syn - real) ** 2)
    return 1 - torch.sum(real * syn) / (real.norm() * syn.norm() + eps)


def class_loop_reference(model: nn.Module, x_real: torch.Tensor, y_real: torch.Tensor, x_syn: torch.Tensor,
                         y_syn: torch.Tensor, metric: str = "ours", eps: float = 1e-6) -> torch.Tensor:
    """DC ``main.py``'s class loop over the classes present on both sides (ascending)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = x_syn.new_zeros(())
    for c in _common_classes(y_real, y_syn):
        img_real, img_syn = x_real[y_real == c], x_syn[y_syn == c]
        lab_real = torch.full((img_real.shape[0],), c, dtype=torch.long, device=x_real.device)
        lab_syn = torch.full((img_syn.shape[0],), c, dtype=torch.long, device=x_syn.device)
        gw_real = torch.autograd.grad(F.cross_entropy(model(img_real), lab_real), params)
        gw_real = [g.detach().clone() for g in gw_real]
        gw_syn = torch.autograd.grad(F.cross_entropy(model(img_syn), lab_syn), params, create_graph=True)
        loss = loss + match_loss_reference(gw_syn, gw_real, metric, eps)
    return loss


# --- batching helpers ----------------------------------------------------------------------------

def _common_classes(y_real: torch.Tensor, y_syn: torch.Tensor) -> List[int]:
    real = set(torch.unique(y_real).tolist())
    return sorted(real.intersection(torch.unique(y_syn).tolist()))


class _Slots(NamedTuple):
    """One side's samples by class: row g of ``index`` (G, n_max) lists the samples of class
    ``classes[g]`` in input order, padded with index N (a zero image appended by the caller)."""
    index: torch.Tensor
    counts: torch.Tensor       # (G,) int64 on the device
    count_list: List[int]      # the same on the host
    labels: torch.Tensor       # (G * n_max,) the class of every slot, class-major
    identity: bool             # index is arange(N): the input is class-major already, no padding
    weights: Dict[torch.dtype, torch.Tensor]  # _slot_weight per dtype, filled on first use


def _class_slots(y: torch.Tensor, classes: torch.Tensor) -> _Slots:
    n = y.shape[0]
    member = y.unsqueeze(0) == classes.unsqueeze(1)              # (G, N)
    counts = member.sum(1)
    count_list = counts.tolist()
    n_max = max(count_list)
    rank = member.cumsum(1) - 1                                  # position of each sample inside its class
    index = torch.full((classes.shape[0], n_max), n, dtype=torch.long, device=y.device)
    rows, cols = member.nonzero(as_tuple=True)
    index[rows, rank[rows, cols]] = cols
    # DC's batches (per-class real batches concatenated, synthetic sets built class by class) are
    # class-major with equal counts: then each side is used as is, no padded gather per call
    identity = index.numel() == n and bool((index.reshape(-1) == torch.arange(n, device=y.device)).all())
    labels = classes.repeat_interleave(n_max)
    return _Slots(index, counts, count_list, labels, identity, {})


def _slot_weight(slots: _Slots, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(G, n_max): 1/n_c for real samples, 0 for padding (index n), so the weighted CE sum of a row
    is that class's CE mean. Computed once per layout and dtype (``n`` is the layout's own N)."""
    if dtype not in slots.weights:
        slots.weights[dtype] = (slots.index < n).to(dtype) / slots.counts.unsqueeze(1).to(dtype)
    return slots.weights[dtype]


class _ClassLayout(NamedTuple):
    classes: List[int]         # the classes present on both sides, ascending
    cls: torch.Tensor          # the same on the device
    real: _Slots
    syn: _Slots


# (id(y_real), id(y_syn)) -> (weakref real, version real, weakref syn, version syn, layout)
_layouts: Dict[Tuple[int, int], tuple] = {}
_LAYOUT_CACHE_SIZE = 16


def _build_layout(y_real: torch.Tensor, y_syn: torch.Tensor) -> _ClassLayout:
    classes = _common_classes(y_real, y_syn)
    if not classes:
        return _ClassLayout([], y_syn.new_empty(0, dtype=torch.long), None, None)
    cls = torch.tensor(classes, dtype=torch.long, device=y_syn.device)
    return _ClassLayout(classes, cls, _class_slots(y_real, cls), _class_slots(y_syn, cls))


def class_layout(y_real: torch.Tensor, y_syn: torch.Tensor) -> _ClassLayout:
    """The class layout of a label pair, computed once per pair of label tensors (cached on their
    identities and version counters: DD loops reuse their label tensors, and any in-place write
    bumps the version). Building it reads the labels on the host (syncs); a cache hit does not."""
    try:
        versions = (y_real._version, y_syn._version)
    except RuntimeError:  # inference tensors have no version counter: no caching
        return _build_layout(y_real, y_syn)
    key = (id(y_real), id(y_syn))
    entry = _layouts.get(key)
    if entry is not None and entry[0]() is y_real and entry[2]() is y_syn and (entry[1], entry[3]) == versions:
        return entry[4]
    layout = _build_layout(y_real, y_syn)
    if len(_layouts) >= _LAYOUT_CACHE_SIZE:
        _layouts.pop(next(iter(_layouts)))
    drop = lambda _ref, k=key: _layouts.pop(k, None)  # noqa: E731
    _layouts[key] = (weakref.ref(y_real, drop), versions[0], weakref.ref(y_syn, drop), versions[1], layout)
    return layout


def _with_zero_sample(x: torch.Tensor) -> torch.Tensor:
    """``x`` with one zero sample appended: index N of ``_class_slots`` padding."""
    return torch.cat([x, x.new_zeros((1,) + tuple(x.shape[1:]))])


def _gather_padded(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows of ``x`` (index N: the zero sample) in ``index``'s shape. index_select, not
    advanced indexing: its backward is one index_add (advanced indexing's is a sorting
    index_put), and the samples in a layout are distinct, so the sum order is fixed."""
    rows = _with_zero_sample(x).index_select(0, index.reshape(-1))
    return rows.reshape(tuple(index.shape) + tuple(x.shape[1:]))


def _class_rows(x: torch.Tensor, slots: _Slots, g: int) -> torch.Tensor:
    """The samples of the layout's g-th class, in input order (no boolean mask: no sync)."""
    return x.index_select(0, slots.index[g, :slots.count_list[g]])


def _freeze_batchnorm(model: nn.Module, x_real: torch.Tensor, layout: _ClassLayout, per_class: int) -> None:
    """DC main.py's BatchNorm handling: running stats from one real batch, then eval mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    if not bns:
        return
    batch = torch.cat([_class_rows(x_real, layout.real, g)[:per_class] for g in range(len(layout.classes))])
    with torch.no_grad():
        model(batch)
    for m in bns:
        m.eval()


# --- the op --------------------------------------------------------------------------------------

class GradientMatcher:
    """DC's class loop as one op: ``matcher(x_real, y_real, x_syn, y_syn)`` returns

        Σ_c gradient_match(∇θ CE_mean(model(x_syn_c), c), ∇θ CE_mean(model(x_real_c), c))

    over the classes present in both label sets (any order, any count per class), differentiable
    w.r.t. ``x_syn`` (real side constant). ``metric``/``eps``/``backend`` go to
    ``ddfast.gradient_match``; ``strategy`` picks how per-class gradients are batched (module doc).
    ``bn_images_per_class``: real images per class used for BatchNorm running statistics (DC: 16).
    ``real_chunk_size``: real images per chunk on the "segmented" path (whole classes per chunk;
    None: all at once) — bounds activation memory, e.g. CIFAR-100 with 256 real images per class.
    ``real_precision``: None (default: the inputs' precision), "bf16" or "fp16": the real side's
    per-class gradients are computed in that type (fp32 inputs only; "loop"/"vmap" under
    ``torch.autocast``, "segmented" on cast images and weights) and returned in the inputs' dtype;
    the synthetic side and the match stay in full precision. Measured on CPU (ConvNet-3 w32, 4
    classes, 8 real + 2 synthetic images per class, 16 px, fp32, metric "ours", random images,
    ``tests/test_real_precision.py``): the loss changes by relative 2-3e-4 and the image gradient
    by relative L2 8.0e-2 (bf16) or 2.5e-2 (fp16), alike for every strategy. It halves the real
    side's bytes on a GPU (untimed: no GPU measurement yet).
    ``cuda_graph=True``: on CUDA, the step after the input checks (both sides' per-class gradients
    and the match, forward and backward to ``x_syn``) is captured once per static configuration
    (shapes, label tensors, parameter storage, module modes) and replayed from a CUDA graph
    (``ddfast/ops/_cuda_graph.py``); on CPU, or when capture fails, it runs eagerly with one
    warning. Parameters may be updated in place between calls (DC's network training); a new
    network or new label tensors capture again. Not yet run on a GPU (``tests/test_cuda_graph.py``
    holds the CUDA checks, skipped without one).
    ``fuse_real`` (default True): on the "segmented" path, on CUDA with Triton (backend "auto" or
    "triton"), the real side runs each instance norm → ReLU (→ 2×2 average pool) block whose norm
    parameters need no per-class gradient (metric "ours": DC's ConvNet) as one ``norm_relu_pool``
    kernel forward and one backward: a read of the conv output instead of ATen's ~5 full-size
    passes each way. Equal up to fp32 rounding; not yet timed on a GPU. False: the modules.
    After a call, ``last_strategy`` says which strategy ran and ``segmented_reason`` why the model
    does not qualify for "segmented" (None when it does).
    """

    def __init__(self, model: nn.Module, metric: str = "ours", eps: float = 1e-6, *, strategy: str = "auto",
                 backend: str = "auto", bn_images_per_class: int = 16, real_chunk_size: Optional[int] = 2048,
                 real_precision: Optional[str] = None, cuda_graph: bool = False, fuse_real: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.metric = check_choice("metric", metric, METRICS)
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.eps = float(eps)
        self.strategy = check_choice("strategy", strategy, STRATEGIES)
        self.backend = backend
        if not isinstance(bn_images_per_class, int) or bn_images_per_class < 1:
            raise ValueError(f"bn_images_per_class must be a positive int, got {bn_images_per_class!r}")
        self.bn_images_per_class = bn_images_per_class
        if real_chunk_size is not None and (not isinstance(real_chunk_size, int) or real_chunk_size < 1):
            raise ValueError(f"real_chunk_size must be a positive int or None, got {real_chunk_size!r}")
        self.real_chunk_size = real_chunk_size
        self.real_precision = check_real_precision(real_precision)
        self.cuda_graph = check_cuda_graph(cuda_graph)
        if not isinstance(fuse_real, bool):
            raise TypeError(f"fuse_real must be a bool, got {type(fuse_real).__name__}")
        self.fuse_real = fuse_real
        self._graph = GraphedStep("GradientMatcher")
        self.last_strategy: Optional[str] = None  # what the last call ran ("auto" resolved)
        self.segmented_reason: Optional[str] = None  # why the model cannot take "segmented", if known

    def __repr__(self) -> str:
        return (f"GradientMatcher({type(self.model).__name__}, metric={self.metric!r}, eps={self.eps}, "
                f"strategy={self.strategy!r})")

    def __call__(self, x_real: torch.Tensor, y_real: torch.Tensor, x_syn: torch.Tensor,
                 y_syn: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x_real", x_real, min_dim=2)
        check_float_tensor("x_syn", x_syn, min_dim=2)
        check_labels("y_real", y_real, x_real.shape[0])
        check_labels("y_syn", y_syn, x_syn.shape[0])
        check_same_device(x_real=x_real, y_real=y_real, x_syn=x_syn, y_syn=y_syn)
        check_same_dtype(x_real=x_real, x_syn=x_syn)
        if x_real.shape[1:] != x_syn.shape[1:]:
            raise ValueError(f"x_real and x_syn must have the same per-sample shape; got "
                             f"{tuple(x_real.shape[1:])} and {tuple(x_syn.shape[1:])}")
        check_finite("x_real", x_real)  # one pass each, small next to the forward passes
        check_finite("x_syn", x_syn)
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        if not names:
            raise ValueError("model has no parameters that require grad")
        x_real = x_real.detach()
        layout = class_layout(y_real, y_syn)
        if not layout.classes:  # every class skipped: an empty sum, still connected to x_syn
            return x_syn.reshape(-1)[:0].sum()
        _freeze_batchnorm(self.model, x_real, layout, self.bn_images_per_class)
        if self.cuda_graph:  # the checks, the layout and DC's BatchNorm switch stay eager (side effects)
            key = (tensor_key(x_real, x_syn), label_key(y_real, y_syn), module_key(self.model), tuple(names))
            return self._graph(lambda xr, xs: self._step(names, layout, xr, xs), key, (x_real, x_syn))
        return self._step(names, layout, x_real, x_syn)

    def _step(self, names: List[str], layout: "_ClassLayout", x_real: torch.Tensor,
              x_syn: torch.Tensor) -> torch.Tensor:
        """Per-class gradients of both sides and their grouped distance (no host sync once warm)."""
        strategy, plan, state = self.strategy, None, None
        if strategy in ("auto", "segmented"):
            state = {n: p.detach() for n, p in self.model.named_parameters()}
            plan = self._segmented_plan(names, state, x_syn)
            if plan is None and strategy == "segmented":
                raise ValueError(f"strategy='segmented' does not apply to this model: {self.segmented_reason}")
            if plan is not None and (x_syn.device.type != "cpu" or _cpu_segmented_pays(plan, state, x_real)):
                strategy = "segmented"
            elif strategy == "auto":  # measured, see the module doc
                strategy = "vmap" if x_syn.device.type == "cuda" else "loop"
        self.last_strategy = strategy
        if strategy == "segmented":
            # "ours" gives rank-1 tensors (biases, norm affines) exactly 0: no per-class gradients
            # and no graph for them (unless nothing else is trainable)
            matched = [n for n in names if self.metric != "ours" or state[n].dim() != 1] or names
            g_real, g_syn = self._grads_segmented(plan, state, matched, layout, x_real, x_syn)
        elif strategy == "vmap":
            g_real, g_syn = self._grads_vmap(names, layout, x_real, x_syn)
        else:
            g_real, g_syn = self._grads_loop(names, layout, x_real, x_syn)
        return _grouped_distance(g_syn, g_real, self.metric, self.eps, self.backend)

    def _split_state(self, names: List[str]) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        params = dict(self.model.named_parameters())
        frozen = {n: p for n, p in params.items() if n not in set(names)}
        frozen.update(dict(self.model.named_buffers()))
        return {n: params[n].detach() for n in names}, frozen

    def _segmented_plan(self, names, state, probe):
        from ._segmented_grads import NotSegmentable, plan_for

        try:
            plan = plan_for(self.model, names, state, probe)
        except NotSegmentable as exc:
            self.segmented_reason = str(exc)
            return None
        self.segmented_reason = None
        return plan

    def _grads_segmented(self, plan, state, names, layout: _ClassLayout, x_real, x_syn):
        from ._segmented_grads import class_grads, segment_bounds

        def grads(x, slots: _Slots, create_graph, chunk, state):
            index, weight = slots.index, _slot_weight(slots, x.shape[0], x.dtype).reshape(-1)
            G, n = index.shape
            # class-major input: used as is; else the slots are gathered from x and a zero sample
            samples = x if slots.identity else _gather_padded(x, index.reshape(-1))
            bounds = segment_bounds(G, n, chunk)
            fuse = not create_graph and self._fuses(x.device)
            if len(bounds) == 1:
                return class_grads(plan, state, names, samples, slots.labels, weight, G, n, create_graph, fuse)
            parts = [class_grads(plan, state, names, samples[a * n:b * n], slots.labels[a * n:b * n],
                                 weight[a * n:b * n], b - a, n, create_graph, fuse) for a, b in bounds]
            return [torch.cat(p) for p in zip(*parts)]

        # the segmented pass calls aten backward ops directly, which autocast does not reach: cast
        # the real images and the weights themselves
        low = lowered_dtype(x_real.dtype, self.real_precision)
        real_state = state if low is None else {k: v.to(low) if v.is_floating_point() else v for k, v in state.items()}
        g_real = grads(x_real if low is None else x_real.to(low), layout.real, False, self.real_chunk_size,
                       real_state)
        return _full(g_real, x_syn.dtype), grads(x_syn, layout.syn, True, None, state)

    def _fuses(self, device: torch.device) -> bool:
        """Whether the real side runs its norm blocks through the Triton norm_relu_pool."""
        from .norm_relu_pool import fusion_available

        return fusion_available(self.fuse_real, self.backend, device)

    def _grads_vmap(self, names, layout: _ClassLayout, x_real, x_syn):
        from torch.func import functional_call, grad, vmap

        params, frozen = self._split_state(names)
        model = self.model

        def weighted_ce(p, x, y, w):
            out = functional_call(model, (p, frozen), (x,))
            return (w * F.cross_entropy(out, y, reduction="none")).sum()

        per_class = vmap(grad(weighted_ce), in_dims=(None, 0, 0, 0), randomness="different")

        def grads(x, slots: _Slots):
            labels = layout.cls.unsqueeze(1).expand_as(slots.index)
            g = per_class(params, _gather_padded(x, slots.index), labels, _slot_weight(slots, x.shape[0], x.dtype))
            return [g[n] for n in names]

        with real_side(x_real.device, self.real_precision):
            g_real = grads(x_real, layout.real)
        return _full(g_real, x_syn.dtype), grads(x_syn, layout.syn)

    def _grads_loop(self, names, layout: _ClassLayout, x_real, x_syn):
        from torch.func import functional_call

        params, frozen = self._split_state(names)
        leaves = {n: p.requires_grad_() for n, p in params.items()}  # fresh leaves: no .grad on the model
        order = [leaves[n] for n in names]

        def class_grad(x, g, create_graph):
            labels = layout.cls[g].expand(x.shape[0])
            out = functional_call(self.model, (leaves, frozen), (x,))
            return torch.autograd.grad(F.cross_entropy(out, labels), order, create_graph=create_graph)

        G = len(layout.classes)
        with real_side(x_real.device, self.real_precision):
            real = [class_grad(_class_rows(x_real, layout.real, g), g, False) for g in range(G)]
        syn = [class_grad(_class_rows(x_syn, layout.syn, g), g, True) for g in range(G)]
        stack = lambda per_cls: [torch.stack(gs) for gs in zip(*per_cls)]  # noqa: E731
        return _full(stack(real), x_syn.dtype), stack(syn)


def _full(grads: List[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
    """The real side's gradients, detached, in the synthetic side's dtype (a no-op unless they were
    computed at ``real_precision``)."""
    return [g.detach().to(dtype) for g in grads]


# CPU, 2-core Xeon, ConvNet-3 with 3-10 classes (`python -m ddfast.bench.sweep_gradient_matcher`).
# Loop vs segmented ms, by first-layer activations of the whole real batch: 0.66M 58 vs 33,
# 1.5M 71 vs 73, 2.6M 147 vs 125, 5.2M 174 vs 185 (w32) and 267 vs 205 (w128), 10.5M 299 vs 372,
# 21M 567 vs 960. Past a few million elements the dense big-batch passes fall out of cache and the
# per-class loop wins; on CPU "auto" switches there. Re-measured after the dispatched-ops rework
# (2-core AMD EPYC, one thread, 2026-11-25), loop vs segmented ms: 0.66M 93 vs 48, 1.5M 126 vs 113,
# 2.6M 161 vs 144, 5.2M 269 vs 229 (w32) and 450 vs 447 (w128), 10.5M 701 vs 910, 21M 1370 vs 1853:
# the same crossover.
_CPU_SEGMENTED_MAX_ACTIVATIONS = 6_000_000


def _cpu_segmented_pays(plan, state, x_real: torch.Tensor) -> bool:
    from ._segmented_grads import first_activation_numel

    return first_activation_numel(plan, state, x_real) * x_real.shape[0] <= _CPU_SEGMENTED_MAX_ACTIVATIONS


def _grouped_distance(g_syn: List[torch.Tensor], g_real: List[torch.Tensor], metric: str, eps: float,
                      backend: str) -> torch.Tensor:
    """Σ over classes of the match distance, one ``ddfast.gradient_match(grouped=True)`` call."""
    from .gradient_match import gradient_match

    return gradient_match(g_syn, g_real, metric, eps=eps, grouped=True, reduction="sum", backend=backend)
