"""bn_stat cases: one BatchNorm statistic loss, and SRe2L's recovery step on a ResNet-18-like teacher
(every BatchNorm2d hooked, as SRe2L: BNStatMatcher vs its BNFeatureHook; forward + backward to the images;
also the matcher with fuse_batchnorm=True, provider "fused-bn")."""
import torch
from torch import nn

import ddfast
from ddfast.ops.bn_eval_stat import bn_eval_stat_reference
from ddfast.ops.bn_stat import bn_stat_loss_reference

from ..case import Case


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


def resnet18_like(num_classes=1000, width=64):
    """ResNet-18 layout (7×7 stem, 4 stages of 2 basic blocks, 20 BatchNorms)."""
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = width
    for i, cout in enumerate((width, 2 * width, 4 * width, 8 * width)):
        layers += [_Block(cin, cout, 1 if i == 0 else 2), _Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def _teacher_inputs(batch, size, width):
    def make(device):
        torch.manual_seed(0)
        model = resnet18_like(width=width).to(device).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
        x = torch.randn(batch, 3, size, size, device=device).requires_grad_(True)
        return {"model": model, "x": x}
    return make


def _sre2l_step(model, x, first_weight=1.0, with_output=False):
    """SRe2L's hooks: per BatchNorm, mean over (N, H, W), biased var of the permuted view, two norms;
    the first layer's loss times ``first_weight`` (its first_bn_multiplier). ``with_output``:
    (model output, loss)."""
    feats = []

    def hook(module, inputs, _out):
        inp = inputs[0]
        nch = inp.shape[1]
        mean = inp.mean([0, 2, 3])
        var = inp.permute(1, 0, 2, 3).contiguous().reshape([nch, -1]).var(1, unbiased=False)
        feats.append(torch.norm(module.running_mean.data - mean, 2) + torch.norm(module.running_var.data - var, 2))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    loss = first_weight * feats[0] + sum(feats[1:]) if first_weight != 1.0 else sum(feats)
    return (out, loss) if with_output else loss


def _teacher_only(model, x):
    """The floor: the teacher's forward and backward to the images, no BatchNorm statistic (every
    provider runs these convolutions, BatchNorms and ReLUs alike)."""
    return model(x).sum()


def _matcher_step(backend, model, x):
    """BNStatMatcher's step; variant "fused-bn": each BatchNorm and its loss in bn_eval_stat's fused
    kernels (fuse_batchnorm=True; backend auto: Triton on CUDA, C++ on CPU)."""
    fuse = backend == "fused-bn"
    with ddfast.BNStatMatcher(model, backend="auto" if fuse else backend, fuse_batchnorm=fuse) as matcher:
        model(x)
        return matcher.loss()


def _layer_inputs(n, c, hw):
    def make(device):
        g = torch.Generator().manual_seed(0)
        x = (torch.randn(n, c, hw, hw, generator=g) * 2 + 0.5).to(device).requires_grad_(True)
        rm = torch.randn(c, generator=g).to(device)
        rv = (torch.rand(c, generator=g) + 0.5).to(device)
        return {"x": x, "running_mean": rm, "running_var": rv}
    return make


def _eval_bn_inputs(n, c, hw):
    def make(device):
        inputs = _layer_inputs(n, c, hw)(device)
        g = torch.Generator().manual_seed(1)
        inputs.update(weight=torch.randn(c, generator=g).to(device), bias=torch.randn(c, generator=g).to(device))
        return inputs
    return make


def cases():
    out = []
    for n, c, hw, default in ((32, 64, 32, True), (100, 64, 112, False)):
        out.append(Case(
            name=f"bn_stat/b{n}-c{c}-{hw}x{hw}",
            op="bn_stat",
            make_inputs=_layer_inputs(n, c, hw),
            reference=bn_stat_loss_reference,
            fused=lambda backend, **kw: ddfast.bn_stat_loss(**kw, backend=backend),
            grad_inputs=("x",),
            default=default,
            # forward reads x once; backward reads x and writes grad_x
            bytes_moved=lambda inp: 3 * inp["x"].numel() * inp["x"].element_size(),
            size=n * c * hw * hw,
        ))
    out.append(Case(  # one layer of a frozen teacher and its hook: what bn_eval_stat fuses
        name="bn_stat/eval-bn-b100-c64-112x112",
        op="bn_eval_stat",
        make_inputs=_eval_bn_inputs(100, 64, 112),
        reference=bn_eval_stat_reference,
        fused=lambda backend, **kw: ddfast.bn_eval_stat(**kw, backend=backend),
        grad_inputs=("x",),
        default=False,
        # forward reads x and writes y; backward reads x and grad_y and writes grad_x
        bytes_moved=lambda inp: 5 * inp["x"].numel() * inp["x"].element_size(),
        size=100 * 64 * 112 * 112,
        notes="eval-mode BatchNorm (F.batch_norm) + SRe2L's hook loss of its input vs bn_eval_stat; both outputs "
              "get gradient ones",
    ))
    out.append(Case(
        name="bn_stat/resnet18-224-b100",
        op="bn_stat",
        make_inputs=_teacher_inputs(100, 224, 64),
        reference=_sre2l_step,
        fused=_matcher_step,
        variants=("fused-bn",),
        grad_inputs=("x",),
        default=False,
        tol=1e-3,
        size=100 * 3 * 224 * 224,
        floor=_teacher_only,
        notes="whole teacher forward + backward to the images; only the 20 BatchNorm losses differ; floor = "
              "the teacher's forward + backward without them (above floor: the BatchNorm losses' share)",
    ))
    return out
