"""MSCN masks and fills, SimMIM masks (pipelines/augment/masks.py): shapes, exact counts, parameter
distributions over many samples, and fills that leave unmasked pixels untouched."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.augment import masks as M

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def gen(device, seed=0):
    return torch.Generator(device=device).manual_seed(seed)


@pytest.mark.parametrize("device", DEVICES)
def test_cells_to_pixels_follows_the_cell_rule(device):
    cells = torch.rand(3, 2, 8, 8, generator=gen(device), device=device) < 0.5
    grid = torch.tensor([4, 7, 8], device=device)
    out = M.cells_to_pixels(cells, grid, 20, 26, torch.bool)
    assert out.shape == (3, 2, 20, 26) and out.dtype == torch.bool
    for n, g in enumerate(grid.tolist()):
        rows = [y * g // 20 for y in range(20)]
        cols = [x * g // 26 for x in range(26)]
        expect = cells[n][:, rows][:, :, cols]
        assert torch.equal(out[n], expect)
    # a grid that divides the image is plain nearest upsampling
    up = M.cells_to_pixels(cells[:1, :, :4, :4], 4, 32, 32)
    torch.testing.assert_close(up, F.interpolate(cells[:1, :, :4, :4].float(), size=(32, 32), mode="nearest"))
    assert M.pixel_counts(20, 7).sum() == 20 and M.pixel_counts(224, 7).tolist() == [32] * 7
    for size in (1, 5, 20, 30, 96, 224):                              # the closed form vs counting
        for g in (1, 3, 7, 8, 14):
            expect = np.bincount([y * g // size for y in range(size)], minlength=g)
            assert M.pixel_counts(size, g).tolist() == expect.tolist(), (size, g)


@pytest.mark.parametrize("device", DEVICES)
def test_random_cells_mask_the_ratio_exactly(device):
    n = 4000
    grid = torch.tensor([7, 8], device=device).repeat(n // 2)
    ratio = torch.full((n,), 0.15, device=device)
    cells = M.random_cells(grid, 8, ratio, 3, gen(device))
    assert cells.shape == (n, 3, 8, 8)
    counts = cells.flatten(2).sum(2).float()                         # (N, 3)
    for g in (7, 8):
        sel = grid == g
        target = 0.15 * g * g
        assert set(counts[sel].unique().tolist()) <= {math.floor(target), math.ceil(target)}
        assert abs(counts[sel].mean().item() - target) < 0.03         # stochastic rounding: exact mean
        assert not cells[sel][:, :, g:, :].any() and not cells[sel][:, :, :, g:].any()
    # every cell of the grid equally likely; channels independent: P(masked in both) = 0.15^2 on
    # the grid's cells (all 64 for g = 8, 49 of the 64 for g = 7)
    freq = cells[grid == 8].float().mean((0, 1))
    assert (freq - 0.15).abs().max() < 0.03
    both = (cells[:, 0] & cells[:, 1]).float().mean() / (0.15 ** 2 * (0.5 * 49 / 64 + 0.5))
    assert 0.8 < both < 1.25


@pytest.mark.parametrize("device", DEVICES)
def test_focal_cells_keep_one_square(device):
    n = 3000
    grid = torch.full((n,), 8, device=device)
    side = torch.rand(n, generator=gen(device), device=device) * 0.3 + 0.5        # 0.5-0.8
    cells = M.focal_cells(grid, 8, side, gen(device, 1))
    kept = ~cells[:, 0]
    rows, cols = kept.any(2), kept.any(1)
    s = rows.sum(1)
    assert torch.equal(s, cols.sum(1))                                # square
    assert torch.equal(kept.sum((1, 2)), s * s)                       # one solid block
    assert torch.equal(s, (side * 8).round().long())
    top = rows.float().argmax(1)
    # the position is uniform over the g - s + 1 places
    expected = ((8 - s) / 2).float().mean()
    assert abs(top.float().mean() - expected) < 0.1


@pytest.mark.parametrize("device", DEVICES)
def test_mscn_cells_choices_follow_their_probabilities(device):
    n = 4000
    g = gen(device)
    ratio = torch.full((n,), 0.15, device=device)
    focal = torch.rand(n, generator=g, device=device) < 0.4
    channelwise = torch.rand(n, generator=g, device=device) < 0.8
    side = torch.full((n,), 0.6, device=device)
    apply = torch.arange(n, device=device) % 2 == 0
    cells, grid = M.mscn_cells(n, (7, 8), ratio, focal, side, channelwise, apply, g)
    assert cells.shape == (n, 3, 8, 8)
    assert abs((grid == 7).float().mean().item() - 0.5) < 0.05
    assert not cells[~apply].any()                                    # not masked at all
    on = apply
    same = (cells[:, 0] == cells[:, 1]).all((1, 2)) & (cells[:, 1] == cells[:, 2]).all((1, 2))
    assert same[on & focal].all()                                     # focal: one mask, all channels
    assert same[on & ~focal & ~channelwise].all()                     # spatial-wise: one mask
    assert (~same[on & ~focal & channelwise]).float().mean() > 0.9    # channel-wise: independent
    masked = cells[on].float().flatten(1).mean(1) * 64 / grid[on].pow(2).float()
    grid_ratio = masked[~focal[on]].mean().item()
    assert abs(grid_ratio - 0.15) < 0.01


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["zero", "mean", "noise"])
def test_fill_touches_masked_elements_only(device, kind):
    x = torch.rand(4, 3, 64, 64, generator=gen(device), device=device)
    mask = (torch.rand(4, 3, 64, 64, generator=gen(device, 1), device=device) < 0.3).float()
    out = M.fill(x, mask, kind, noise_std=0.5, gen=gen(device, 2))
    keep = mask == 0
    assert torch.equal(out[keep], x[keep])
    if kind == "zero":
        assert (out[~keep] == 0).all()
    elif kind == "mean":
        mean = x.mean((2, 3), keepdim=True).expand_as(x)
        assert torch.equal(out[~keep], mean[~keep])
    else:
        noise = out[~keep]
        assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.5) < 0.01
    with pytest.raises(ValueError, match="fill"):
        M.fill(x, mask, "blue")


@pytest.mark.parametrize("device", DEVICES)
def test_simmim_masks(device):
    masks = M.simmim_masks(2000, 7, 7, 0.6, gen(device), device)
    assert masks.shape == (2000, 7, 7) and masks.dtype == torch.bool
    assert (masks.sum((1, 2)) == math.ceil(0.6 * 49)).all()
    freq = masks.float().mean(0)
    assert (freq - 30 / 49).abs().max() < 0.05                        # uniform over the patches
    up = M.upsample_mask(masks[:3], 8)
    assert up.shape == (3, 56, 56) and torch.equal(up[:, ::8, ::8], masks[:3])
    assert torch.equal(up[:, 5::8, 7::8], masks[:3])
