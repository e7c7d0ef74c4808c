"""ddfast.compat.mtt.mtt_inner_loss equals distill.py's inner loop (a transcription) on its own arguments."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from ddfast.compat.mtt import ParamDiffAug, mtt_inner_loss
from test_trajectory_matcher import DSA, distill_py_iteration, grads_of, make_problem, run_on_flat


class FlatNet(nn.Module):
    """The interface of mtt's ReparamModule: one ``flat_param`` and ``forward(x, flat_param=...)``."""

    def __init__(self, net):
        super().__init__()
        self.net = [net]  # kept out of the module tree, as ReparamModule removes the inner parameters
        self._param_infos = tuple(n for n, _ in net.named_parameters())
        self.flat_param = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in net.parameters()]))

    def forward(self, x, flat_param=None):
        return run_on_flat(self.net[0], self.flat_param if flat_param is None else flat_param, x)


def _args(**kw):
    base = dict(syn_steps=5, batch_syn=3, dsa="True", no_aug=False, dsa_strategy=DSA, dsa_param=ParamDiffAug(),
                texture=False)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("mode", ["exact", "unrolled"])
@pytest.mark.parametrize("dsa", ["True", False])
def test_inner_loss_equals_distill_py(mode, dsa):
    net, images, labels, start, target = make_problem("convnet")
    args = _args(dsa=dsa)
    shapes = [p.shape for p in net.parameters()]
    start_list = [t.view(s) for t, s in zip(start.split([s.numel() for s in shapes]), shapes)]  # expert lists
    target_list = [t.view(s) for t, s in zip(target.split([s.numel() for s in shapes]), shapes)]
    torch.manual_seed(4)
    want = grads_of(lambda x, y, a: distill_py_iteration(net, x, y, a, start, target, args.syn_steps, args.batch_syn,
                                                         DSA if dsa else None, args.dsa_param), images, labels)
    student_net = nn.DataParallel(FlatNet(net)) if mode == "unrolled" else FlatNet(net)
    torch.manual_seed(4)
    got = grads_of(lambda x, y, a: mtt_inner_loss(student_net, x, y, a, start_list, target_list, args, mode=mode),
                   images, labels)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-14)


def test_texture_mode_is_refused():
    net, images, labels, start, target = make_problem("mlp")
    with pytest.raises(ValueError, match="texture"):
        mtt_inner_loss(FlatNet(net), images, labels, torch.tensor(0.01, dtype=images.dtype), start, target,
                       _args(texture=True))
