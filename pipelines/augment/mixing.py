"""Mixing a view with the same view of the reversed batch: MixMask's block masks (Vishniakov et al. 2022) and Un-Mix's
mixup / cutmix (the base method MixMask builds on). Each returns the mixed batch and lam (N,): the
fraction of each mixed image's pixels that come from its own, un-reversed image, which the mixed loss
needs (loss = lam * L(m, t) + (1 - lam) * L(m, t_reversed)).

MixMask (Vishniakov et al. 2022, ImageNet: "mask type block, grid size 8"; its code masks half of the cells):
the masked region is a union of rectangles of whole grid cells (at least `min_cells` cells, aspect
ratio log-uniform in `aspect`), BEiT's block pattern, which keeps objects in one piece where a random
("discrete") cell pattern breaks them (supplement, Fig. 2). The masked cells show the reversed batch.
Drawn for every sample at once: `rects` random rectangles per sample, earlier ones taking priority;
the first `count` cells in that priority order (rectangle by rectangle, raster order inside the last
one, from a random corner) are masked, so every sample masks exactly `count` cells (ratio * G^2,
stochastically rounded) and the region stays blocky. Cells outside all rectangles only fill up a
rare shortfall. As with BEiT's generator, central cells are masked more often than corner ones.

Un-Mix: lam ~ Beta(beta, beta) per sample; each sample is mixed by mixup (lam x + (1 - lam) x_rev)
with probability `mixup_p`, otherwise by cutmix (a box of area about 1 - lam from x_rev, clipped to
the image; lam is recomputed from the clipped box). Un-Mix picks one kind per step; here every
sample picks, so one batch carries both kinds and no step is all-global or all-local.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from pipelines.augment.masks import cells_to_pixels, pixel_counts


# ---- MixMask --------------------------------------------------------------------------------------

def block_cells(n: int, grid: int, ratio: float, gen: torch.Generator, device, min_cells: int = 4,
                aspect: tuple[float, float] = (0.3, 1 / 0.3), rects: int = 8) -> torch.Tensor:
    """(N, 1, G, G) bool, True = masked (shows the reversed image): blocky, ratio * G^2 cells."""
    total = grid * grid
    target = ratio * total
    count = math.floor(target) + (torch.rand(n, generator=gen, device=device) < target - math.floor(target)).long()
    # rectangles: area uniform in [min_cells, count], aspect log-uniform, strictly inside the grid
    hi = torch.clamp(count.float(), min=float(min_cells))
    area = torch.rand(n, rects, generator=gen, device=device) * (hi[:, None] - min_cells) + min_cells
    log_a = torch.rand(n, rects, generator=gen, device=device) * math.log(aspect[1] / aspect[0]) + math.log(aspect[0])
    h = (area * log_a.exp()).sqrt().round().clamp(1, grid - 1)
    w = (area / log_a.exp()).sqrt().round().clamp(1, grid - 1)
    top = (torch.rand(n, rects, generator=gen, device=device) * (grid - h + 1)).floor()
    left = (torch.rand(n, rects, generator=gen, device=device) * (grid - w + 1)).floor()
    r = torch.arange(grid, device=device).float()
    in_r = (r >= top[..., None]) & (r < (top + h)[..., None])                  # (N, R, G)
    in_c = (r >= left[..., None]) & (r < (left + w)[..., None])
    inside = in_r[..., :, None] & in_c[..., None, :]                            # (N, R, G, G)
    # priority: rectangle 0 highest; raster order inside a rectangle, from a random corner (so the
    # partly used last rectangle favours no side); uncovered cells last, in random order
    level = torch.arange(rects, 0, -1, device=device).float().view(1, rects, 1, 1)
    score = (inside.float() * level).amax(1)                                    # (N, G, G) in [0, R]
    flip = torch.rand(n, 2, 1, generator=gen, device=device) < 0.5
    rr = torch.where(flip[:, 0], grid - 1 - r, r)                               # (N, G)
    cc = torch.where(flip[:, 1], grid - 1 - r, r)
    raster = (rr[:, :, None] * grid + cc[:, None, :]) / (2 * total)             # (N, G, G) in [0, 0.5)
    fallback = torch.rand(n, grid, grid, generator=gen, device=device) * 0.4
    score = torch.where(score > 0, score - raster, fallback)
    rank = (-score).flatten(1).argsort(1).argsort(1)
    return (rank < count[:, None]).view(n, 1, grid, grid)


def mixmask(x: torch.Tensor, cells: torch.Tensor, x_rev: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (N, C, H, W), cells (N, 1, G, G) bool -> x with its masked cells taken from x_rev
    (default x.flip(0), the reversed batch): lerp with a 0/1 weight, exact copies either way."""
    _, _, h, w = x.shape
    mask = cells_to_pixels(cells, cells.shape[-1], h, w, x.dtype)                # (N, 1, H, W)
    return torch.lerp(x, x.flip(0) if x_rev is None else x_rev, mask)


def block_lam(cells: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N,) fraction of each mixed image's pixels from the image itself: 1 - the masked pixel share,
    from the cells and the pixel count of each cell row and column (equal to the pixel mask's mean)."""
    g = cells.shape[-1]
    ph = pixel_counts(height, g, cells.device).float()
    pw = pixel_counts(width, g, cells.device).float()
    masked = (cells[:, 0].float() * ph[:, None] * pw[None, :]).sum((1, 2)) / (height * width)
    return 1.0 - masked


# ---- Un-Mix ---------------------------------------------------------------------------------------

def sample_gamma(alpha: float, n: int, gen: torch.Generator, device, rounds: int = 8) -> torch.Tensor:
    """(n,) Gamma(alpha, 1) draws from the given generator (torch's own sampler takes none).

    Marsaglia-Tsang squeeze, `rounds` proposals per sample drawn at once and the first accepted one
    kept (acceptance >= 0.95 per proposal, so all 8 fail with probability < 1e-10; then the mode-ish
    value d is used). alpha < 1: Gamma(alpha + 1) * U^(1 / alpha)."""
    a = alpha if alpha >= 1 else alpha + 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    z = torch.randn(rounds, n, generator=gen, device=device)
    u = torch.rand(rounds, n, generator=gen, device=device)
    v = (1.0 + c * z) ** 3
    ok = (v > 0) & (u.log() < 0.5 * z * z + d - d * v + d * v.clamp(min=1e-30).log())
    first = ok.float().argmax(0)                                                # first accepted round
    g = torch.where(ok.any(0), d * v.gather(0, first[None])[0], torch.full_like(v[0], d))
    if alpha < 1:
        g = g * torch.rand(n, generator=gen, device=device).pow(1.0 / alpha)
    return g


def sample_beta(a: float, b: float, n: int, gen: torch.Generator, device) -> torch.Tensor:
    """(n,) Beta(a, b) = X / (X + Y), X ~ Gamma(a), Y ~ Gamma(b)."""
    x, y = sample_gamma(a, n, gen, device), sample_gamma(b, n, gen, device)
    return x / (x + y)


def cutmix_boxes(lam: torch.Tensor, height: int, width: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Un-Mix's / CutMix's box of area (1 - lam) H W around a uniform random centre, clipped.

    -> (boxes (N, 4) int64 top, bottom, left, right (exclusive), lam recomputed from the clipped box)."""
    n, dev = lam.shape[0], lam.device
    cut = (1.0 - lam).clamp(0, 1).sqrt()
    ch, cw = (height * cut).floor().long(), (width * cut).floor().long()
    cy = torch.randint(height, (n,), generator=gen, device=dev)
    cx = torch.randint(width, (n,), generator=gen, device=dev)
    top, bottom = (cy - ch // 2).clamp(0, height), (cy + ch // 2).clamp(0, height)
    left, right = (cx - cw // 2).clamp(0, width), (cx + cw // 2).clamp(0, width)
    area = ((bottom - top) * (right - left)).float()
    return torch.stack([top, bottom, left, right], 1), 1.0 - area / (height * width)


def box_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 4) boxes -> (N, 1, H, W) bool, True inside."""
    dev = boxes.device
    y, x = torch.arange(height, device=dev), torch.arange(width, device=dev)
    in_y = (y[None] >= boxes[:, 0:1]) & (y[None] < boxes[:, 1:2])
    in_x = (x[None] >= boxes[:, 2:3]) & (x[None] < boxes[:, 3:4])
    return (in_y[:, :, None] & in_x[:, None, :])[:, None]


def unmix(x: torch.Tensor, lam: torch.Tensor, use_mixup: torch.Tensor, boxes: torch.Tensor,
          x_rev: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mixup (weight lam on x) for samples with use_mixup, cutmix with `boxes` for the others, in one
    pass: lerp(x, x_rev, w) with w = 1 - lam or the box indicator. lerp is exact at weights 0 and 1,
    so cutmix pixels are copies. The cutmix samples' lam is the box's (cutmix_boxes)."""
    _, _, h, w = x.shape
    box = box_mask(boxes, h, w).to(x.dtype)                                      # (N, 1, H, W)
    mix = use_mixup.to(x.dtype).view(-1, 1, 1, 1)
    weight = box * (1.0 - mix) + ((1.0 - lam).to(x.dtype).view(-1, 1, 1, 1) * mix)
    return torch.lerp(x, x.flip(0) if x_rev is None else x_rev, weight)
