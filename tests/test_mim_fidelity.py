"""MIM as the papers run it: SimMIM's mask-token encoder blind to masked pixels (the fill before the
stem), LUT's two masked views with disjoint visible sets, and MixMAE's per-source BatchNorm memory."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import masksiam  # noqa: F401
from eval.common import EvalError
from eval.export import export_state_dict
from masksiam.config import Config, to_dict
from models.mim import MaskTokenEncoder, expand_mask, fill_masked, stem_stride
from models.resnet import build_backbone, build_backbone_from_config


def _net(arch="resnet10", width=8, small_stem=False, seed=0):
    torch.manual_seed(seed)
    return build_backbone(arch, small_stem=small_stem, width=width, zero_init_residual=False).train()


def _mask(n, cells, seed=1, ratio=0.6):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, cells * cells, generator=g)
    k = int(round(ratio * cells * cells))
    return (scores.argsort(1).argsort(1) < k).view(n, cells, cells)


def stem_leak_fraction(backbone, mask: torch.Tensor, size: int) -> float:
    """The fraction of masked pixels inside the receptive field of a visible stem output.

    The stem's geometry alone: its conv with all-ones weights and its max-pool as an average pool of
    the same window (every pixel of a window reaches the output, as some input makes it the max),
    so a pixel gets gradient exactly when a visible output's window covers it."""
    conv, pool = backbone.conv1, backbone.maxpool
    x = torch.zeros(mask.shape[0], 1, size, size, requires_grad=True)
    h = F.conv2d(x, torch.ones(1, 1, *conv.kernel_size), None, conv.stride, conv.padding)
    if not isinstance(pool, torch.nn.Identity):
        h = F.avg_pool2d(h, pool.kernel_size, pool.stride, pool.padding, count_include_pad=True)
    visible = ~expand_mask(mask, h.shape[2], h.shape[3])[:, None]
    (h * visible).sum().backward()
    masked = expand_mask(mask, size, size)[:, None]
    return float((x.grad[masked] != 0).float().mean())


# ---- SimMIM: fill before the stem ------------------------------------------------------------------------

def test_fill_masked_values():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    mask = torch.tensor([[[True, False], [False, False]], [[False, False], [False, True]]])
    px = expand_mask(mask, 4, 4)[:, None].expand_as(x)
    assert torch.equal(fill_masked(x, mask, "none"), x)
    z = fill_masked(x, mask, "zero")
    assert torch.equal(z[~px], x[~px]) and torch.count_nonzero(z[px]) == 0
    m = fill_masked(x, mask, "mean")
    for i in range(2):
        for c in range(3):
            vis = x[i, c][~px[i, c]]
            assert torch.equal(m[i, c][px[i, c]], vis.mean().expand(4))      # the visible pixels' mean
    assert torch.equal(m[~px], x[~px])


@pytest.mark.parametrize("arch,small_stem,size", [("resnet10", False, 64), ("resnet10", True, 32)])
@pytest.mark.parametrize("fill", ["zero", "mean"])
def test_filled_token_encoder_features_ignore_masked_pixels(arch, small_stem, size, fill):
    """Change only masked pixels (by a lot): every feature, visible or not, and the running
    statistics stay exactly the same (train mode: BatchNorm on batch statistics)."""
    net = _net(arch, small_stem=small_stem)
    patch = 8 if small_stem else 32
    n = 4
    x = torch.randn(n, 3, size, size)
    mask = _mask(n, size // patch)
    noisy = torch.where(expand_mask(mask, size, size)[:, None], torch.randn_like(x) * 100, x)
    enc = MaskTokenEncoder(net, fill)
    twin = copy.deepcopy(net)
    f1, f2 = enc(net, x, mask), enc(twin, noisy, mask)
    assert torch.equal(f1, f2)
    assert all(torch.equal(a, b) for a, b in zip(net.buffers(), twin.buffers()))


@pytest.mark.parametrize("arch,small_stem,size", [("resnet10", False, 128), ("resnet10", True, 32)])
def test_unfilled_token_encoder_reads_masked_pixels(arch, small_stem, size):
    """SimMIM's original ResNet (fill none): the visible features far from any mask border are the
    same, those next to one change: the leak the fill removes."""
    net = _net(arch, small_stem=small_stem).eval()
    patch = 8 if small_stem else 32
    x = torch.randn(4, 3, size, size)
    mask = _mask(4, size // patch)
    noisy = torch.where(expand_mask(mask, size, size)[:, None], torch.randn_like(x) * 100, x)
    enc = MaskTokenEncoder(net, "none")
    with torch.no_grad():
        s1, s2 = enc.tokenized_stem(net, x, mask), enc.tokenized_stem(net, noisy, mask)
    changed = (s1 != s2).any(1)                                            # (N, H/4, W/4)
    vis = ~expand_mask(mask, s1.shape[2], s1.shape[3])
    # visible stem outputs 3+ outputs from any masked one: unchanged (the ImageNet stem's 11 px window
    # at stride 4 reaches 2 outputs across a border); some nearer ones changed
    interior = F.max_pool2d((~vis)[:, None].float(), 5, 1, 2)[:, 0] == 0
    assert not changed[interior].any()
    assert changed[vis & ~interior].any()


@pytest.mark.parametrize("arch,small_stem,size,patch,expected", [
    ("resnet50", False, 224, 32, (0.12, 0.18)),     # the 14.3 % (ResNet-50, 224 px, ratio 0.6)
    ("resnet18", True, 32, 8, (0.10, 0.20)),        # the small stem at Fashion-MNIST's size
])
def test_stem_leak_fraction_without_fill(arch, small_stem, size, patch, expected):
    net = build_backbone(arch, small_stem=small_stem, width=8)
    frac = stem_leak_fraction(net, _mask(8, size // patch), size)
    assert expected[0] < frac < expected[1], frac


def test_simmim_stem_leaks_a_seventh_of_the_imagenet_stem():
    """Seed 004's stem (3x3/2 conv + 2x2 max-pool; the issue's 2.0 %): a 5 px window per output, so
    only the 1 px before each visible cell is read; the same stride 4 and 224 px -> 7 x 7 features."""
    cfg = Config(arch="resnet50", stem="simmim", size=224, width=8)
    net = build_backbone_from_config(cfg)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (2, 2) and stem_stride(net) == 4
    mask = _mask(8, 224 // 32)
    frac = stem_leak_fraction(net, mask, 224)
    imagenet = stem_leak_fraction(build_backbone("resnet50", width=8), mask, 224)
    assert 0.01 < frac < 0.03 and frac < imagenet / 5, (frac, imagenet)
    assert net(torch.zeros(1, 3, 224, 224)).shape == (1, 8 * 8 * 4)
    # the token encoder runs on it, and filled, its features ignore masked pixels as every stem's do
    x = torch.randn(2, 3, 64, 64)
    m = _mask(2, 2)
    noisy = torch.where(expand_mask(m, 64, 64)[:, None], torch.randn_like(x) * 100, x)
    enc, twin = MaskTokenEncoder(net, "zero"), copy.deepcopy(net)
    assert torch.equal(enc(net, x, m), enc(twin, noisy, m))
    with pytest.raises(EvalError, match="SimMIM's 3x3 stem"):
        export_state_dict({"config": to_dict(cfg), "backbone": net.state_dict()})


# ---- MixMAE: per-source BatchNorm that keeps only its input for backward ---------------------------------

def _reference_source_bn(enc, m, x):
    """The per-source BatchNorm as plain autograd ops (what SourceBatchNorm replaces)."""
    xf = x.float()
    ind = enc.indicator(x.shape[2], x.shape[3], torch.float32)
    count = ind.sum((1, 3, 4))
    mean = (xf[None] * ind).sum((1, 3, 4)) / count.clamp_min(1.0)
    var = (((xf[None] - mean[:, None, :, None, None]) ** 2) * ind).sum((1, 3, 4)) / count.clamp_min(1.0)
    scale = m.weight.float() * torch.rsqrt(var + m.eps)
    shift = m.bias.float() - mean * scale
    pos_scale = (ind * scale[:, None, :, None, None]).sum(0)
    pos_shift = (ind * shift[:, None, :, None, None]).sum(0)
    with torch.no_grad():
        total = count.sum()
        w = count / total
        m.running_mean.lerp_((w * mean).sum(0), m.momentum)
        m.running_var.lerp_((w * var).sum(0) * total / (total - 1).clamp_min(1.0), m.momentum)
        m.num_batches_tracked.add_(1)
    return torch.addcmul(pos_shift, xf, pos_scale).to(x.dtype)


def _encoders():
    from models.mim import SourceEncoder
    return SourceEncoder


@pytest.mark.parametrize("kind", ["mixed", "sparse"])
def test_source_batchnorm_equals_the_autograd_ops(kind, monkeypatch):
    """The whole mixed / sparse encoder with SourceBatchNorm against the same encoder with the plain
    autograd BatchNorm: features and running statistics bit for bit, every gradient to rounding."""
    SourceEncoder = _encoders()
    net = _net("resnet10", small_stem=True)
    twin = copy.deepcopy(net)
    x = torch.randn(4, 3, 32, 32)
    mask = _mask(4, 4, ratio=0.5)
    make = SourceEncoder.mixed if kind == "mixed" else SourceEncoder.sparse
    f = make(mask)(net, x)
    g = torch.randn_like(f)
    (f * g).sum().backward()
    monkeypatch.setattr(SourceEncoder, "batchnorm", _reference_source_bn)
    f_ref = make(mask)(twin, x)
    (f_ref * g).sum().backward()
    assert torch.equal(f, f_ref)
    assert all(torch.equal(a, b) for a, b in zip(net.buffers(), twin.buffers()))
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        # fp32 sums in another order: within 1e-5 of the gradient's scale (measured: 1e-6)
        assert (p.grad - q.grad).abs().max() <= 1e-5 * q.grad.abs().max(), name


def test_source_batchnorm_gradcheck():
    from models.mim import SourceBatchNorm
    torch.manual_seed(0)
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    cells = torch.tensor([[[0, 1], [1, -1]], [[1, 1], [0, 0]], [[-1, 0], [0, 1]]])
    ind = torch.stack([expand_mask(cells == s, 4, 4) for s in (0, 1)]).to(torch.float64)[:, :, None]
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: SourceBatchNorm.apply(x, ind, w, b, 1e-5)[0], (x, w, b))
    y = SourceBatchNorm.apply(x, ind, w, b, 1e-5)[0]
    assert torch.count_nonzero(y.detach()[ind.sum(0).expand_as(y) == 0]) == 0   # no source: 0


def saved_bytes(fn) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves during fn() (saved-tensor hooks)."""
    seen: dict[int, int] = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def test_mixed_encoder_saves_less_for_backward(monkeypatch):
    """ResNet-50 (width 16) mixed encoder at 64 px: what autograd keeps for backward shrinks."""
    SourceEncoder = _encoders()
    net = _net("resnet50", width=16)
    x = torch.randn(2, 3, 64, 64)
    mask = _mask(2, 2, ratio=0.5)
    new, _ = saved_bytes(lambda: SourceEncoder.mixed(mask)(net, x))
    monkeypatch.setattr(SourceEncoder, "batchnorm", _reference_source_bn)
    old, _ = saved_bytes(lambda: SourceEncoder.mixed(mask)(net, x))
    assert new < 0.6 * old, (new, old)


# ---- LUT as Kim et al. 2024 runs it -------------------------------------------------------------------------------

SMALL_HEADS = {"decoder_dim": 16, "proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32}


def _hp(cls, **kw):
    return {**cls.DEFAULTS, **SMALL_HEADS, **kw}


def _smooth(n, seed, size=32):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.randn(n, 3, 4, 4, generator=g), size=(size, size), mode="bilinear")


def _two_views(n=6, ratio=0.6, seed=0):
    from types import SimpleNamespace
    from pipelines.augment.masks import disjoint_simmim_masks
    m0, m1 = disjoint_simmim_masks(n, 4, 4, ratio, 2, torch.Generator().manual_seed(seed), "cpu")
    return SimpleNamespace(views=[_smooth(n, seed + 1), _smooth(n, seed + 2)], mim_masks=[m0, m1])


def test_disjoint_masks_each_a_simmim_mask_with_disjoint_visible_cells():
    from pipelines.augment.masks import disjoint_simmim_masks
    g = torch.Generator().manual_seed(0)
    for ratio, rows in ((0.6, 4), (0.5, 4), (0.6, 7), (0.75, 2)):
        masks = disjoint_simmim_masks(64, rows, rows, ratio, 2, g, "cpu")
        hidden = -(-int(ratio * 1000) * rows * rows // 1000)                    # ceil(ratio * cells)
        for m in masks:
            assert (m.flatten(1).sum(1) == hidden).all()
        assert not (~masks[0] & ~masks[1]).any()                                # visible cells disjoint
        if ratio == 0.5:
            assert torch.equal(masks[0], ~masks[1])                             # MixMAE: complementary
        # each cell visible in view 0 about (1 - ratio) of the time: uniform over cells
        freq = (~masks[0]).float().mean(0)
        assert freq.min() > 0.25 * (1 - ratio) and freq.max() < 2.5 * (1 - ratio)
    with pytest.raises(ValueError, match="ratio"):
        disjoint_simmim_masks(4, 4, 4, 0.4, 2, g, "cpu")


@pytest.mark.parametrize("recipe", ["simmim_lut_8px", "mixmae_lut_8px"])
def test_lut_recipes_mask_both_views_disjointly(recipe):
    from pipelines.augment.engine import build_augmenter
    aug = build_augmenter(recipe, 32, seed=0)
    views = [torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8) for _ in range(2)]
    out = aug(views)
    m0, m1 = out.mim_masks
    assert m0.shape == m1.shape == (8, 4, 4)
    assert not (~m0 & ~m1).any()
    assert aug.recipe.branches[1].color is not None and aug.recipe.branches[0].color is None


def _np_context(p, z):
    import numpy as np
    p, z = p.detach().double().numpy(), z.detach().double().numpy()
    cos = (p * z).sum(1) / (np.linalg.norm(p, axis=1) * np.linalg.norm(z, axis=1))
    return float((2 - 2 * cos).mean())


@pytest.mark.parametrize("name", ["simmim", "mixmae"])
def test_lut_term_is_the_mean_of_the_two_cross_view_terms(name):
    """The method's lut_loss against a numpy reference built from its pieces: student features pooled
    over visible positions (numpy), projector + predictor, the eval-mode teacher on the other view."""
    from losses import MixMAE, SimMIM
    cls = SimMIM if name == "simmim" else MixMAE
    torch.manual_seed(0)
    method = cls(_net(small_stem=True), _hp(cls, lut_weight=0.25, decoder_depth=1))
    out = _two_views(ratio=0.6 if name == "simmim" else 0.5)
    ref = copy.deepcopy(method)
    _, logs = method(out)
    assert not method.lut.teacher.training                                 # the teacher ran in eval mode
    p, zt = {}, {}
    for k in (0, 1):
        r = ref.reconstruct(out, k)
        if name == "simmim":                                               # pooled: visible positions only
            f = ref.tokens(ref.backbone, out.views[k], out.mim_masks[k]).detach().numpy()
            vis = (~out.mim_masks[k]).numpy()[:, None]
            pooled = (f * vis).sum((2, 3)) / vis.sum((2, 3))
            torch.testing.assert_close(r["pooled"], torch.from_numpy(pooled).float(), rtol=1e-5, atol=1e-6)
        p[k] = ref.lut.predictor(ref.lut.projector(r["pooled"]))
        with torch.no_grad():
            ref.lut.teacher.eval()
            z = ref.lut.teacher(out.views[k])[1]
            zt[k] = torch.cat([z, z.flip(0)]) if name == "mixmae" else z
    expected = 0.5 * (_np_context(p[0], zt[1]) + _np_context(p[1], zt[0]))
    assert abs(float(logs["lut_loss"]) - expected) < 1e-5


@pytest.mark.parametrize("name", ["simmim", "mixmae"])
def test_lut_loss_is_symmetric_in_the_two_views(name):
    from types import SimpleNamespace
    from losses import MixMAE, SimMIM
    cls = SimMIM if name == "simmim" else MixMAE
    torch.manual_seed(0)
    method = cls(_net(small_stem=True), _hp(cls, lut_weight=0.25, decoder_depth=1))
    out = _two_views(ratio=0.6 if name == "simmim" else 0.5)
    swapped = SimpleNamespace(views=out.views[::-1], mim_masks=out.mim_masks[::-1])
    twin = copy.deepcopy(method)
    _, a = method(out)
    _, b = twin(swapped)
    for key in ("loss", "mim_loss", "lut_loss"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=0), key


def test_lut_teacher_projection_of_an_image_depends_on_it_alone():
    """Eval mode: changing the other images of the batch leaves image 0's teacher target unchanged."""
    from losses import SimMIM
    torch.manual_seed(0)
    method = SimMIM(_net(small_stem=True), _hp(SimMIM, lut_weight=0.25))
    out = _two_views()
    got = []
    method.lut.teacher.register_forward_hook(lambda _m, _i, o: got.append(o[1].detach()))
    method(out)
    out.views[1] = torch.cat([out.views[1][:1], torch.randn_like(out.views[1][1:])])
    out.views[0] = torch.cat([out.views[0][:1], torch.randn_like(out.views[0][1:])])
    method(out)
    torch.testing.assert_close(got[0][0], got[2][0])                       # the teacher on view 0: twice
    torch.testing.assert_close(got[1][0], got[3][0])
