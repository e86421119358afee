"""MixMask block masks and Un-Mix mixup / cutmix (pipelines/augment/mixing.py): the mixed image and its lam
agree pixel for pixel; mask ratios, blockiness and the Beta sampler's moments on many samples."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.measure import label

from pipelines.augment import mixing as X
from pipelines.augment.masks import cells_to_pixels

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def gen(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("device", DEVICES)
def test_block_cells_mask_the_ratio_in_few_blocks(device):
    n = 2000
    cells = X.block_cells(n, 8, 0.5, gen(device), device)
    assert cells.shape == (n, 1, 8, 8) and cells.dtype == torch.bool
    assert (cells.sum((1, 2, 3)) == 32).all()                           # 0.5 * 64 exactly
    cells3 = X.block_cells(n, 8, 0.3, gen(device, 1), device)
    counts = cells3.sum((1, 2, 3)).float()
    assert set(counts.unique().tolist()) <= {19.0, 20.0} and abs(counts.mean() - 19.2) < 0.05
    # blocky: few 4-connected pieces per mask, where a random ("discrete") pattern of the same
    # ratio breaks into many
    blocks = [label(m, connectivity=1).max() for m in cells[:300, 0].cpu().numpy()]
    rand = torch.rand(300, 64, generator=gen("cpu", 2)).argsort(1).argsort(1).lt(32).view(300, 8, 8).numpy()
    scattered = [label(m, connectivity=1).max() for m in rand]
    assert np.mean(blocks) < 2.5 and np.mean(scattered) > 2 * np.mean(blocks)
    # every cell can be masked and no side is favoured; rectangles cover the centre more often than
    # the corners, as in BEiT's generator that MixMask uses (there about 0.82 and 0.15 at ratio 0.5)
    freq = cells.float().mean((0, 1))
    assert 0.08 < freq[0, 0] < 0.22 and 0.74 < freq[3, 3] < 0.9
    for sym in (freq.flip(0), freq.flip(1), freq.t()):
        assert (freq - sym).abs().max() < 0.06


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [32, 30])                              # 30: cells of 3 and 4 px
def test_mixmask_mix_and_lam_agree_pixel_for_pixel(device, size):
    x = torch.rand(6, 3, size, size, generator=gen(device), device=device)
    cells = X.block_cells(6, 8, 0.5, gen(device, 1), device)
    mixed = X.mixmask(x, cells)
    mask = cells_to_pixels(cells, 8, size, size, torch.bool)            # (N, 1, H, W)
    assert torch.equal(mixed, torch.where(mask, x.flip(0), x))
    lam = X.block_lam(cells, size, size)
    torch.testing.assert_close(lam, 1.0 - mask.float().mean((1, 2, 3)), atol=1e-6, rtol=0)
    own = (mixed == x).all(1) & (x != x.flip(0)).all(1)                 # pixels that show the image itself
    torch.testing.assert_close(own.float().mean((1, 2)), lam, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("a,b", [(1.0, 1.0), (0.5, 0.5), (2.0, 5.0)])
def test_sample_beta_moments(device, a, b):
    s = X.sample_beta(a, b, 40000, gen(device), device)
    assert ((s >= 0) & (s <= 1)).all()
    mean, var = a / (a + b), a * b / ((a + b) ** 2 * (a + b + 1))
    assert abs(s.mean().item() - mean) < 4 * math.sqrt(var / 40000)
    assert abs(s.var().item() - var) < 0.05 * var
    if a == b == 1.0:                                                   # uniform: flat histogram
        hist = torch.histc(s.cpu(), bins=10, min=0, max=1) / 40000
        assert (hist - 0.1).abs().max() < 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_cutmix_boxes_and_unmix(device):
    n, h, w = 400, 24, 20
    g = gen(device)
    lam = torch.rand(n, generator=g, device=device)
    boxes, box_lam = X.cutmix_boxes(lam, h, w, g)
    top, bottom, left, right = boxes.unbind(1)
    assert (0 <= top).all() and (top <= bottom).all() and (bottom <= h).all()
    assert (0 <= left).all() and (left <= right).all() and (right <= w).all()
    torch.testing.assert_close(box_lam, 1 - ((bottom - top) * (right - left)).float() / (h * w))
    # unclipped boxes have area close to (1 - lam): the box sides are floor(side * sqrt(1 - lam))
    inside = (top > 0) & (bottom < h) & (left > 0) & (right < w)
    assert ((box_lam - lam)[inside] > -0.2).all()
    x = torch.rand(n, 3, h, w, generator=g, device=device)
    use_mixup = torch.arange(n, device=device) % 2 == 0
    mixed = X.unmix(x, lam, use_mixup, boxes)
    rev = x.flip(0)
    mix_ref = lam.view(-1, 1, 1, 1) * x + (1 - lam.view(-1, 1, 1, 1)) * rev
    torch.testing.assert_close(mixed[use_mixup], mix_ref[use_mixup], atol=1e-6, rtol=0)
    box = X.box_mask(boxes, h, w)
    cut = ~use_mixup
    assert torch.equal(mixed[cut], torch.where(box, rev, x)[cut])        # copies, both sides
    own = (mixed == x).all(1) & (x != rev).all(1)
    torch.testing.assert_close(own.float().mean((1, 2))[cut], box_lam[cut], atol=1e-6, rtol=0)
