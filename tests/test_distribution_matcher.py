"""DistributionMatcher against DM's per-class loop (main_DM.py): loss and image gradients."""
import importlib.util

import pytest
import torch
from torch import nn

import ddfast
from ddfast.ops.distribution_matcher import dm_reference_loop

from conftest import require_backend

OP = "class_mean_loss"
STRATEGY = "color_crop_cutout_flip_scale_rotate"


def _has(module):
    return importlib.util.find_spec(module) is not None


def _convnet_embed(channels=3, width=8, depth=2, dtype=torch.float64, device="cpu"):
    """DC's ConvNet feature extractor: (conv3x3 → instance norm (GroupNorm(w, w)) → ReLU → AvgPool2) × depth."""
    torch.manual_seed(0)
    layers, c = [], channels
    for _ in range(depth):
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.GroupNorm(width, width, affine=True), nn.ReLU(),
                   nn.AvgPool2d(2)]
        c = width
    net = nn.Sequential(*layers, nn.Flatten()).to(device=device, dtype=dtype)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _data(num_classes, n_real, ipc, device, dtype=torch.float64, size=8):
    g = torch.Generator().manual_seed(1)
    x_real = torch.randn(num_classes * n_real, 3, size, size, generator=g, dtype=dtype).to(device)
    y_real = torch.arange(num_classes).repeat(n_real)[torch.randperm(num_classes * n_real, generator=g)].to(device)
    x_syn = torch.randn(num_classes * ipc, 3, size, size, generator=g, dtype=dtype).to(device)
    y_syn = torch.arange(num_classes).repeat_interleave(ipc).to(device)  # DM's layout [0,0,..,1,1,..]
    return x_real, y_real, x_syn, y_syn


def _run(fn, x_syn):
    x = x_syn.detach().clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_equals_reference_loop(device, backend_kind, dtype):
    backend = require_backend(OP, backend_kind, device)
    embed = _convnet_embed(dtype=dtype, device=device)
    x_real, y_real, x_syn, y_syn = _data(4, 6, 2, device, dtype)
    matcher = ddfast.DistributionMatcher(embed, 4, backend=backend)
    got, g_got = _run(lambda x: matcher(x_real, y_real, x, y_syn), x_syn)
    want, g_want = _run(lambda x: dm_reference_loop(embed, x_real, y_real, x, y_syn, 4), x_syn)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got, want, rtol=rtol, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=rtol, atol=rtol * g_want.abs().max().item())


def test_missing_class_and_single_syn_samples(device):
    embed = _convnet_embed(device=device)
    x_real, y_real, x_syn, _ = _data(3, 4, 2, device)
    y_syn = torch.tensor([0, 2, 2, 0, 0, 2], device=device)  # class 1 has no syn images
    matcher = ddfast.DistributionMatcher(embed)
    got, g_got = _run(lambda x: matcher(x_real, y_real, x[:5], y_syn[:5]), x_syn)
    want, g_want = _run(lambda x: dm_reference_loop(embed, x_real, y_real, x[:5], y_syn[:5], 3), x_syn)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 5, 7, 24])
def test_chunked_real_side_equals_reference_loop(device, chunk):
    embed = _convnet_embed(device=device)
    x_real, y_real, x_syn, y_syn = _data(4, 6, 2, device)
    y_real = y_real.clone()
    y_real[y_real == 3] = 0  # class 3 has synthetic images only: skipped, as in the loop
    matcher = ddfast.DistributionMatcher(embed, 4, real_chunk_size=chunk)
    got, g_got = _run(lambda x: matcher(x_real, y_real, x, y_syn), x_syn)
    want, g_want = _run(lambda x: dm_reference_loop(embed, x_real, y_real, x, y_syn, 4), x_syn)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_chunking_options_are_validated():
    embed = _convnet_embed()
    with pytest.raises(ValueError, match="real_chunk_size"):
        ddfast.DistributionMatcher(embed, real_chunk_size=0)
    with pytest.raises(ValueError, match="real_chunk_size"):
        ddfast.DistributionMatcher(embed, real_chunk_size=8, loss="mmd")


@pytest.mark.skipif(not (_has("ddfast.ops.dsa") and _has("ddfast.compat._dc_dsa")), reason="dsa_augment not present")
def test_dsa_equals_reference_loop_with_per_class_seeds():
    from ddfast.compat.dc import DiffAugment, ParamDiffAug

    embed = _convnet_embed()
    x_real, y_real, x_syn, y_syn = _data(3, 4, 2, "cpu", size=8)
    seeds = [123, 4567, 89]
    matcher = ddfast.DistributionMatcher(embed, 3, dsa_strategy=STRATEGY, dsa_param=ParamDiffAug(), dsa_rng="reference")
    got, g_got = _run(lambda x: matcher(x_real, y_real, x, y_syn, seeds=seeds), x_syn)

    def augment(images, seed):
        return DiffAugment(images, STRATEGY, seed=seed, param=ParamDiffAug())

    want, g_want = _run(lambda x: dm_reference_loop(embed, x_real, y_real, x, y_syn, 3, augment, seeds), x_syn)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    # a seed generator gives the same, deterministically
    seeded = ddfast.DistributionMatcher(embed, 3, dsa_strategy=STRATEGY, seed_fn=lambda c: seeds, dsa_rng="reference")
    torch.testing.assert_close(seeded(x_real, y_real, x_syn, y_syn), got, rtol=1e-12, atol=0)


@pytest.mark.skipif(not _has("ddfast.ops.mmd"), reason="ddfast.mmd not present")
def test_linear_mmd_equals_class_mean_loss():
    embed = _convnet_embed()
    x_real, y_real, x_syn, y_syn = _data(3, 5, 2, "cpu")
    mean_loss = ddfast.DistributionMatcher(embed, 3)(x_real, y_real, x_syn, y_syn)
    mmd_loss = ddfast.DistributionMatcher(embed, 3, loss="mmd", mmd_kwargs={"kernel": "linear"})(
        x_real, y_real, x_syn, y_syn)
    torch.testing.assert_close(mmd_loss, mean_loss, rtol=1e-8, atol=1e-10)


def test_bad_input():
    embed = _convnet_embed()
    x_real, y_real, x_syn, y_syn = _data(2, 3, 1, "cpu")
    matcher = ddfast.DistributionMatcher(embed, 2)
    with pytest.raises(TypeError, match="y_real"):
        matcher(x_real, y_real.double(), x_syn, y_syn)
    with pytest.raises(ValueError, match="y_syn"):
        matcher(x_real, y_real, x_syn, y_syn + 2)
    with pytest.raises(ValueError, match="y_syn"):
        matcher(x_real, y_real, x_syn, y_syn[:1])
    with pytest.raises(TypeError, match="x_syn"):
        matcher(x_real, y_real, x_syn.long(), y_syn)
    with pytest.raises(ValueError, match="loss"):
        ddfast.DistributionMatcher(embed, loss="kl")
    with pytest.raises(TypeError, match="embed"):
        ddfast.DistributionMatcher("net")
    if _has("ddfast.ops.dsa"):
        with pytest.raises(ValueError, match="seeds"):
            ddfast.DistributionMatcher(embed, 2, dsa_strategy=STRATEGY)(x_real, y_real, x_syn, y_syn, seeds=[1])


# --- DM's ConvNetBN branch: BatchNorm with batch statistics, real side chunked ---------------------

def _convnet_bn_embed(track_running_stats=True, device="cpu"):
    """DC's ConvNetBN feature extractor (conv → BatchNorm2d → ReLU → AvgPool2) × 2, train mode, frozen weights."""
    torch.manual_seed(0)
    layers, c = [], 3
    for _ in range(2):
        layers += [nn.Conv2d(c, 6, 3, padding=1), nn.BatchNorm2d(6, track_running_stats=track_running_stats),
                   nn.ReLU(), nn.AvgPool2d(2)]
        c = 6
    net = nn.Sequential(*layers, nn.Flatten()).to(device=device, dtype=torch.float64).train()
    with torch.no_grad():  # non-trivial affine parameters and running statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def _dm_bn_branch_reference(embed, x_real, y_real, x_syn, y_syn, num_classes):
    """main_DM.py's ConvNetBN branch: all real images in one forward, all synthetic ones in one, then
    Σ_c ‖mean(output_real[c]) − mean(output_syn[c])‖² (classes in DM's class-major layout)."""
    order_real = torch.argsort(y_real, stable=True)
    output_real = embed(x_real[order_real]).detach()
    output_syn = embed(x_syn)
    per_class_real = output_real.reshape(num_classes, -1, output_real.shape[1])
    per_class_syn = output_syn.reshape(num_classes, -1, output_syn.shape[1])
    return torch.sum((torch.mean(per_class_real, dim=1) - torch.mean(per_class_syn, dim=1)) ** 2)


@pytest.mark.parametrize("track_running_stats", [True, False])
@pytest.mark.parametrize("chunk", [None, 1, 7, 24])
def test_batchnorm_embedding_chunked_equals_dm_bn_branch(track_running_stats, chunk):
    import copy

    embed = _convnet_bn_embed(track_running_stats)
    reference = copy.deepcopy(embed)
    x_real, y_real, x_syn, y_syn = _data(4, 6, 2, "cpu")
    matcher = ddfast.DistributionMatcher(embed, 4, real_chunk_size=chunk)
    got, g_got = _run(lambda x: matcher(x_real, y_real, x, y_syn), x_syn)
    want, g_want = _run(lambda x: _dm_bn_branch_reference(reference, x_real, y_real, x, y_syn, 4), x_syn)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    for m_got, m_want in zip(embed.modules(), reference.modules()):  # same running statistics afterwards
        if isinstance(m_got, nn.BatchNorm2d):
            assert m_got.training
            if track_running_stats:
                torch.testing.assert_close(m_got.running_mean, m_want.running_mean, rtol=1e-12, atol=1e-14)
                torch.testing.assert_close(m_got.running_var, m_want.running_var, rtol=1e-12, atol=1e-14)
                assert int(m_got.num_batches_tracked) == int(m_want.num_batches_tracked) == 2
            else:
                assert m_got.running_mean is None


def test_batchnorm_called_twice_with_chunks_is_refused():
    bn = nn.BatchNorm2d(3).double()
    x_real, y_real, x_syn, y_syn = _data(2, 4, 1, "cpu")
    shared = nn.Sequential(bn, bn, nn.Flatten())
    matcher = ddfast.DistributionMatcher(shared, 2, real_chunk_size=3)
    with pytest.raises(ValueError, match="called twice"):
        matcher(x_real, y_real, x_syn, y_syn)


# --- compat.dc.dm_class_loop_loss against main_DM.py's loop -----------------------------------------

class _DMNet(nn.Module):
    """DC's ConvNet shape with ``embed`` (features) as main_DM.py uses it; norm "instance" or "batch"."""

    def __init__(self, norm):
        super().__init__()
        make_norm = (lambda c: nn.GroupNorm(c, c)) if norm == "instance" else nn.BatchNorm2d
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), make_norm(6), nn.ReLU(), nn.AvgPool2d(2),
                                      nn.Conv2d(6, 6, 3, padding=1), make_norm(6), nn.ReLU(), nn.AvgPool2d(2))
        self.classifier = nn.Linear(6 * 2 * 2, 3)

    def embed(self, x):
        return self.features(x).flatten(1)

    def forward(self, x):
        return self.classifier(self.embed(x))


def _main_dm_loss(net, get_images, image_syn, args, seeds, augment):
    """main_DM.py's "update synthetic data" block (both branches), float64 accumulator."""
    embed = net.embed
    num_classes = image_syn.shape[0] // args.ipc
    if "BN" not in args.model:
        loss = torch.tensor(0.0, dtype=image_syn.dtype)
        for c in range(num_classes):
            img_real = get_images(c, args.batch_real)
            img_syn = image_syn[c * args.ipc:(c + 1) * args.ipc]
            if args.dsa:
                img_real = augment(img_real, args.dsa_strategy, seeds[c], args.dsa_param, False)
                img_syn = augment(img_syn, args.dsa_strategy, seeds[c], args.dsa_param, False)
            output_real = embed(img_real).detach()
            output_syn = embed(img_syn)
            loss += torch.sum((torch.mean(output_real, dim=0) - torch.mean(output_syn, dim=0)) ** 2)
        return loss
    images_real_all, images_syn_all = [], []
    for c in range(num_classes):
        img_real = get_images(c, args.batch_real)
        img_syn = image_syn[c * args.ipc:(c + 1) * args.ipc]
        if args.dsa:
            img_real = augment(img_real, args.dsa_strategy, seeds[c], args.dsa_param, False)
            img_syn = augment(img_syn, args.dsa_strategy, seeds[c], args.dsa_param, False)
        images_real_all.append(img_real)
        images_syn_all.append(img_syn)
    output_real = embed(torch.cat(images_real_all)).detach()
    output_syn = embed(torch.cat(images_syn_all))
    return torch.sum((torch.mean(output_real.reshape(num_classes, args.batch_real, -1), dim=1)
                      - torch.mean(output_syn.reshape(num_classes, args.ipc, -1), dim=1)) ** 2)


@pytest.mark.parametrize("model, norm", [("ConvNet", "instance"), ("ConvNetBN", "batch"), ("ConvNet", "batch")])
@pytest.mark.parametrize("dsa", [False, True])
def test_dm_class_loop_loss_equals_main_dm_loop(model, norm, dsa):
    import copy
    from types import SimpleNamespace

    from test_compat_dsa import _reference_diff_augment

    from ddfast.compat import dc

    torch.manual_seed(0)
    net = _DMNet(norm).double().train()
    for p in net.parameters():
        p.requires_grad = False
    images_all = torch.randn(3 * 7, 3, 8, 8, dtype=torch.float64)
    labels_all = torch.arange(3).repeat(7)
    image_syn = torch.randn(3 * 2, 3, 8, 8, dtype=torch.float64)
    args = SimpleNamespace(ipc=2, batch_real=5, model=model, dsa=dsa, dsa_strategy=STRATEGY,
                           dsa_param=dc.ParamDiffAug())
    seeds = [31, 7, 2024]
    results = []
    for loss_fn in (lambda n, g, x: _main_dm_loss(n, g, x, args, seeds, _reference_diff_augment),
                    lambda n, g, x: dc.dm_class_loop_loss(n, g, x, args, seeds=seeds)):
        picker = torch.Generator().manual_seed(3)

        def get_images(c, n):
            idx = torch.nonzero(labels_all == c).flatten()
            return images_all[idx[torch.randperm(len(idx), generator=picker)][:n]]

        run_net = copy.deepcopy(net)
        torch.manual_seed(11)
        loss, grad = _run(lambda x: loss_fn(run_net, get_images, x), image_syn)
        results.append((loss, grad, torch.random.get_rng_state(), run_net.state_dict()))
    (want, g_want, state_want, net_want), (got, g_got, state_got, net_got) = results
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)
    assert torch.equal(state_got, state_want)
    for key in net_want:  # BatchNorm running statistics move as in the loop
        torch.testing.assert_close(net_got[key], net_want[key], rtol=1e-12, atol=1e-14)


def test_dm_class_loop_loss_bad_input():
    from types import SimpleNamespace

    from ddfast.compat import dc

    net = _DMNet("instance").double()
    args = SimpleNamespace(ipc=4, batch_real=2, model="ConvNet", dsa=False)
    with pytest.raises(ValueError, match="image_syn"):
        dc.dm_class_loop_loss(net, lambda c, n: torch.randn(n, 3, 8, 8), torch.randn(6, 3, 8, 8), args)
    args.ipc = 2
    with pytest.raises(ValueError, match="seeds"):
        dc.dm_class_loop_loss(net, lambda c, n: torch.randn(n, 3, 8, 8, dtype=torch.float64),
                              torch.randn(6, 3, 8, 8, dtype=torch.float64), args, seeds=[1])


def test_device_rng_dsa_is_deterministic_and_a_valid_augmentation():
    embed = _convnet_embed()
    x_real, y_real, x_syn, y_syn = _data(3, 4, 2, "cpu", size=8)
    seeds = [123, 4567, 89]
    matcher = ddfast.DistributionMatcher(embed, 3, dsa_strategy=STRATEGY, dsa_rng="device")
    got, g_got = _run(lambda x: matcher(x_real, y_real, x, y_syn, seeds=seeds), x_syn)
    again, g_again = _run(lambda x: matcher(x_real, y_real, x, y_syn, seeds=seeds), x_syn)
    assert torch.equal(got, again) and torch.equal(g_got, g_again)
    plain = ddfast.DistributionMatcher(embed, 3)(x_real, y_real, x_syn, y_syn)
    assert torch.isfinite(got) and abs(float(got - plain)) > 1e-6  # the images were augmented
    with pytest.raises(ValueError, match="dsa_rng"):
        ddfast.DistributionMatcher(embed, dsa_rng="numpy")


@pytest.mark.parametrize("dsa_strategy", [None, STRATEGY])
def test_step_makes_no_host_sync_after_warm_up(dsa_strategy):
    """A DM step (default configuration, DSA drawn on the device) after one warm-up call: 0 syncs."""
    from ddfast._sync import count_syncs

    embed = _convnet_embed()
    x_real, y_real, x_syn, y_syn = _data(3, 4, 2, "cpu", size=8)
    x_syn.requires_grad_(True)
    matcher = ddfast.DistributionMatcher(embed, 3, dsa_strategy=dsa_strategy)
    matcher(x_real, y_real, x_syn, y_syn).backward()  # warm-up
    with count_syncs() as syncs:
        matcher(x_real, y_real, x_syn, y_syn).backward()
    assert syncs.count == 0, syncs.events


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_reference_stream_step_reads_its_draws_only_and_waits_for_no_queued_work():
    """DM's own DSA draws (dsa_rng="reference") on CUDA: after a warm-up with the same label
    tensors, a step's only device reads are its two sides' draws (made on a side stream), so the
    step returns while earlier work still runs on the current stream; its loss equals an idle GPU's."""
    from ddfast._sync import count_syncs

    embed = _convnet_embed(dtype=torch.float32, device="cuda")
    x_real, y_real, x_syn, y_syn = _data(3, 4, 2, "cuda", dtype=torch.float32, size=16)
    x_syn.requires_grad_(True)
    seeds = [11, 12, 13]
    matcher = ddfast.DistributionMatcher(embed, 3, dsa_strategy=STRATEGY, dsa_rng="reference")
    matcher(x_real, y_real, x_syn, y_syn, seeds=seeds).backward()  # warm-up
    want = matcher(x_real, y_real, x_syn, y_syn, seeds=seeds)
    torch.cuda.synchronize()
    with count_syncs(target="cuda") as syncs:
        matcher(x_real, y_real, x_syn, y_syn, seeds=seeds).backward()
    torch.cuda.synchronize()
    assert [e for e in syncs.events if not e.startswith("cuda sync")] == ["Tensor.cpu()"] * 2, syncs
    torch.cuda._sleep(2 ** 30)  # about half a second of GPU work queued before the step
    done = torch.cuda.Event()
    done.record()
    got = matcher(x_real, y_real, x_syn, y_syn, seeds=seeds)
    assert not done.query(), "the step waited for the work queued before it"
    torch.cuda.synchronize()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


def test_auto_chunking_equals_reference_loop_and_makes_no_sync(monkeypatch):
    """real_chunk_size "auto": above AUTO_CHUNK_ELEMENTS input elements the real side runs in equal
    chunks; a class with synthetic images only and one with real images only are left out, as in
    DM's loop; the chunked step makes no host sync after warm-up."""
    from ddfast._sync import count_syncs
    from ddfast.ops import distribution_matcher as dm

    embed = _convnet_embed()
    x_real, y_real, x_syn, y_syn = _data(4, 6, 2, "cpu")  # 24 real images of 3x8x8 = 192 elements
    y_real = torch.where(y_real == 3, 0, y_real)  # class 3: synthetic only
    keep = y_syn != 2  # class 2: real only
    x_syn, y_syn = x_syn[keep], y_syn[keep]
    monkeypatch.setattr(dm, "AUTO_CHUNK_ELEMENTS", 192 * 10)  # at most 10 images: 3 chunks of 8
    matcher = ddfast.DistributionMatcher(embed, 4)
    assert matcher.chunk_size(x_real) == 8
    assert matcher.chunk_size(x_real[:10]) is None
    got, g_got = _run(lambda x: matcher(x_real, y_real, x, y_syn), x_syn)
    want, g_want = _run(lambda x: dm_reference_loop(embed, x_real, y_real, x, y_syn, 4), x_syn)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)
    # nor a value read a GPU would sync on: under CUDA's checks mode ("once") the step's second
    # call reads nothing (the chunks' label slices are new tensors each call: not re-checked)
    monkeypatch.setattr(ddfast._checks, "_mode", "once")
    for _ in range(2):
        x = x_syn.clone().requires_grad_(True)
        with count_syncs() as syncs:
            matcher(x_real, y_real, x, y_syn).backward()
    assert syncs.count == 0 and not syncs.exempt, syncs


def test_auto_chunks_are_smaller_on_the_cpu():
    """The CPU's "auto" limit (2^19 input elements: DM's CIFAR-10 ipc-50 step measured fastest
    there) chunks a batch one forward would take on a GPU (2^23); shapes only, so a meta tensor
    stands in for the GPU's."""
    from ddfast.ops import distribution_matcher as dm

    matcher = ddfast.DistributionMatcher(_convnet_embed(), 4)
    per_image = 3 * 32 * 32
    n = dm.AUTO_CHUNK_ELEMENTS_CPU // per_image + 1  # 171 CIFAR images: just above the CPU limit
    assert matcher.chunk_size(torch.empty(n - 1, 3, 32, 32)) is None
    assert matcher.chunk_size(torch.empty(n, 3, 32, 32)) == -(-n // 2)  # two equal chunks
    assert matcher.chunk_size(torch.empty(n, 3, 32, 32, device="meta")) is None
    big = dm.AUTO_CHUNK_ELEMENTS // per_image + 1
    assert matcher.chunk_size(torch.empty(big, 3, 32, 32, device="meta")) == -(-big // 2)


@pytest.mark.parametrize("loss", ["mean", "mmd"])
def test_cpu_synthetic_chunks_equal_one_forward_and_the_reference_loop(monkeypatch, loss):
    """On the CPU "auto" embeds the synthetic images in pieces (graphs kept): the loss and the image
    gradient equal one forward's and DM's loop; never with real_chunk_size=None, a batch-statistic
    BatchNorm or off the CPU."""
    from ddfast.ops import distribution_matcher as dm

    embed = _convnet_embed()
    x_real, y_real, x_syn, y_syn = _data(3, 4, 5, "cpu")  # 15 synthetic images of 192 elements
    monkeypatch.setattr(dm, "AUTO_CHUNK_ELEMENTS_CPU_SYN", 192 * 4)  # at most 4 images: 4 chunks of 4
    chunked = ddfast.DistributionMatcher(embed, 3, loss=loss)
    whole = ddfast.DistributionMatcher(embed, 3, loss=loss, real_chunk_size=None)
    assert chunked.syn_chunk_size(x_syn) == 4 and whole.syn_chunk_size(x_syn) is None
    calls = []
    handle = embed.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    got, g_got = _run(lambda x: chunked(x_real, y_real, x, y_syn), x_syn)
    handle.remove()
    assert calls[-4:] == [4, 4, 4, 3]  # the synthetic side's forwards
    want, g_want = _run(lambda x: whole(x_real, y_real, x, y_syn), x_syn)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-14)
    if loss == "mean":
        ref, g_ref = _run(lambda x: dm_reference_loop(embed, x_real, y_real, x, y_syn, 3), x_syn)
        torch.testing.assert_close(got, ref, rtol=1e-10, atol=0)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-10, atol=1e-12)
    assert ddfast.DistributionMatcher(_convnet_bn_embed(), 3).syn_chunk_size(x_syn) is None
    assert chunked.syn_chunk_size(x_syn.to("meta")) is None


def test_auto_chunking_stays_off_where_it_would_change_or_cost(monkeypatch):
    """"auto" keeps one forward for loss "mmd" (it needs every real feature) and for embeddings with
    batch-statistic BatchNorm (chunking them costs extra forwards); None never chunks."""
    from ddfast.ops import distribution_matcher as dm

    monkeypatch.setattr(dm, "AUTO_CHUNK_ELEMENTS", 1)
    x_real = torch.randn(16, 3, 8, 8, dtype=torch.float64)
    assert ddfast.DistributionMatcher(_convnet_embed(), 4, loss="mmd").chunk_size(x_real) is None
    assert ddfast.DistributionMatcher(_convnet_bn_embed(), 4).chunk_size(x_real) is None
    assert ddfast.DistributionMatcher(_convnet_embed(), 4, real_chunk_size=None).chunk_size(x_real) is None
    assert ddfast.DistributionMatcher(_convnet_embed(), 4, real_chunk_size=5).chunk_size(x_real) == 5
    assert ddfast.DistributionMatcher(_convnet_embed(), 4).chunk_size(x_real) == 1
    with pytest.raises(ValueError, match="real_chunk_size"):
        ddfast.DistributionMatcher(_convnet_embed(), real_chunk_size="big")
    # a plain function hides its layers (it may hold a batch-statistic BatchNorm): one forward
    bn = _convnet_bn_embed()
    assert ddfast.DistributionMatcher(lambda x: bn(x), 4).chunk_size(x_real) is None
