"""MIM as the papers run it: SimMIM's mask-token encoder blind to masked pixels (the fill before the
stem), LUT's two masked views with disjoint visible sets, and MixMAE's per-source BatchNorm memory."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import masksiam  # noqa: F401
from models.mim import MaskTokenEncoder, expand_mask, fill_masked
from models.resnet import build_backbone


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
