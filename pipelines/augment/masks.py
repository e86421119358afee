"""Masks: MSCN's random grid, focal and channel-wise masks with their fills (Jing et al. 2022), and SimMIM's
patch masks (Xie et al. 2022).

Every mask is drawn at grid resolution, (N, C, G, G) booleans (True = masked), where it costs
nothing, and expanded to pixels once (`cells_to_pixels`). Pixel row y of a sample with grid g lies in
cell floor(y * g / H), so grids that do not divide the image give cells one pixel apart in size, and
samples with different grids are expanded by the same gather.

MSCN (Jing et al. 2022; defaults in pipelines/augment/recipes/mscn.yaml, chosen from its ablations):
- random grid mask: a g x g grid (g drawn per sample from a small set; 7 or 8 cells per side = 32 or
  28 px cells at 224 px, Table 6), `ratio` of its cells masked (0.15 best, Table 5): exactly
  floor(ratio g^2) or one more, stochastically rounded, so the expected ratio is exact;
- focal mask, instead of the grid mask with probability `focal` (0.4 best, Table 8): everything but
  a random square of whole cells is masked, a crop without resizing (Sec. 4.3). The square's side is
  a fraction of the image side drawn from `focal_side` (the paper gives no size; see the recipe);
- channel-wise independent masks with probability `channelwise` (0.7 in Sec. 4.4, 0.8-0.9 best in
  Table 10): the three colour channels get independent grid masks; otherwise one mask for all three;
- fills: zero (after the high-pass filter zero is "no information"), the image's per-channel mean,
  or gaussian noise N(0, noise_std^2) with a std that differs between branches (Sec. 4.4).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from pipelines.augment.ops import const


# ---- grid cells -> pixels -------------------------------------------------------------------------

def cell_index(size: int, grid: torch.Tensor) -> torch.Tensor:
    """(N,) cells per side -> (N, size) int64: the cell of each pixel row (or column)."""
    pos = torch.arange(size, device=grid.device)
    return (pos[None, :] * grid[:, None]) // size


def cells_to_pixels(cells: torch.Tensor, grid: torch.Tensor | int, height: int, width: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, C, Gmax, Gmax) cells, sample n using its top-left grid[n] x grid[n] block ->
    (N, C, H, W) planar, in `dtype` (1.0 = masked for float: a weight for lerp)."""
    n, c, gmax, _ = cells.shape
    if not isinstance(grid, torch.Tensor):
        grid = torch.full((n,), grid, dtype=torch.long, device=cells.device)
    rows, cols = cell_index(height, grid), cell_index(width, grid)               # (N, H), (N, W)
    m = cells.to(dtype).gather(2, rows[:, None, :, None].expand(n, c, height, gmax))   # (N, C, H, G)
    return m.gather(3, cols[:, None, None, :].expand(n, c, height, width))            # (N, C, H, W)


def pixel_counts(size: int, grid: int, device=None) -> torch.Tensor:
    """(G,) int64: how many pixel rows fall in each cell. Row y lies in cell floor(y g / size), so cell
    c holds rows ceil(c size / g) to ceil((c + 1) size / g) - 1: a closed form computed on the device
    (torch.bincount reads its output size back from the device, a host sync per call)."""
    start = (torch.arange(grid + 1, device=device) * size + grid - 1) // grid     # ceil(c size / g)
    return start[1:] - start[:-1]


def _exact_count(scores: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """True at the `count` lowest scores of each row; scores (N, C, L), count (N,) -> (N, C, L) bool."""
    rank = scores.argsort(-1).argsort(-1)
    return rank < count.view(-1, 1, 1)


def random_cells(grid: torch.Tensor, gmax: int, ratio: torch.Tensor, channels: int,
                 gen: torch.Generator) -> torch.Tensor:
    """Random grid masks: for sample n, floor(ratio[n] g^2) or that + 1 (stochastic rounding) of the
    g x g cells (g = grid[n]) masked, independently per channel -> (N, channels, Gmax, Gmax) bool."""
    n, dev = grid.shape[0], grid.device
    cells = (grid * grid).float()
    target = ratio * cells
    count = target.floor() + (torch.rand(n, generator=gen, device=dev) < target - target.floor()).float()
    scores = torch.rand(n, channels, gmax, gmax, generator=gen, device=dev)
    r = torch.arange(gmax, device=dev)
    outside = (r[None, :, None] >= grid[:, None, None]) | (r[None, None, :] >= grid[:, None, None])
    scores = scores.masked_fill(outside[:, None], 2.0)                # never among the lowest
    return _exact_count(scores.flatten(2), count.long()).view(n, channels, gmax, gmax)


def focal_cells(grid: torch.Tensor, gmax: int, side: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Focal masks: all cells masked except a square of round(side[n] g) cells (at least one) at a
    uniform random position -> (N, 1, Gmax, Gmax) bool."""
    n, dev = grid.shape[0], grid.device
    g = grid.float()
    s = (side * g).round().clamp(min=1.0)
    s = torch.minimum(s, g)
    top = (torch.rand(n, generator=gen, device=dev) * (g - s + 1)).floor()
    left = (torch.rand(n, generator=gen, device=dev) * (g - s + 1)).floor()
    r = torch.arange(gmax, device=dev).float()
    keep_r = (r[None] >= top[:, None]) & (r[None] < (top + s)[:, None])          # (N, G)
    keep_c = (r[None] >= left[:, None]) & (r[None] < (left + s)[:, None])
    return ~(keep_r[:, :, None] & keep_c[:, None, :])[:, None]


def mscn_cells(n: int, grids: tuple[int, ...], ratio: torch.Tensor, focal: torch.Tensor,
               side: torch.Tensor, channelwise: torch.Tensor, apply: torch.Tensor,
               gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One MSCN mask per sample at grid resolution.

    grids: the grid sizes to draw from (uniformly, per sample); ratio (N,) grid-mask ratio;
    focal (N,) bool: focal mask instead of the grid mask; side (N,) kept square side for focal masks;
    channelwise (N,) bool: independent masks per channel; apply (N,) bool: masked at all.
    -> (cells (N, 3, Gmax, Gmax) bool, grid (N,) int64).
    """
    dev = ratio.device
    choices = const(tuple(grids), dev, torch.long)
    grid = choices[torch.randint(len(grids), (n,), generator=gen, device=dev)]
    gmax = max(grids)
    independent = random_cells(grid, gmax, ratio, 3, gen)                         # (N, 3, G, G)
    spatial = independent[:, :1].expand(-1, 3, -1, -1)                           # one mask, 3 channels
    cells = torch.where(channelwise.view(-1, 1, 1, 1), independent, spatial)
    cells = torch.where(focal.view(-1, 1, 1, 1), focal_cells(grid, gmax, side, gen), cells)
    return cells & apply.view(-1, 1, 1, 1), grid


# ---- fills ----------------------------------------------------------------------------------------

FILLS = ("zero", "mean", "noise")


def fill(x: torch.Tensor, mask: torch.Tensor, kind: str, noise_std: float = 1.0,
         gen: Optional[torch.Generator] = None, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x (N, C, H, W) with its masked elements replaced: lerp(x, value, mask), mask 0/1 float of
    x's shape (or broadcastable), so unmasked elements are exact copies.

    zero: 0; mean: the sample's per-channel mean over the whole image; noise: N(0, noise_std^2),
    drawn here from gen, or given (`noise`, x's shape, already scaled)."""
    if kind == "zero":
        value = torch.zeros((), dtype=x.dtype, device=x.device)
    elif kind == "mean":
        value = x.mean((2, 3), keepdim=True)
    elif kind == "noise":
        value = noise if noise is not None else \
            torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype).mul_(noise_std)
    else:
        raise ValueError(f"unknown mask fill {kind!r}; choose one of {', '.join(FILLS)}")
    return torch.lerp(x, value.expand_as(x), mask)


# ---- SimMIM ---------------------------------------------------------------------------------------

def simmim_masks(n: int, rows: int, cols: int, ratio: float, gen: torch.Generator, device) -> torch.Tensor:
    """SimMIM's random patch masks: exactly ceil(ratio * rows * cols) of the patches masked per sample,
    uniformly at random -> (N, rows, cols) bool, True = masked."""
    count = math.ceil(ratio * rows * cols)
    scores = torch.rand(n, 1, rows * cols, generator=gen, device=device)
    total = torch.full((n,), count, dtype=torch.long, device=device)
    return _exact_count(scores, total).view(n, rows, cols)


def disjoint_simmim_masks(n: int, rows: int, cols: int, ratio: float, views: int, gen: torch.Generator,
                          device) -> list[torch.Tensor]:
    """`views` SimMIM masks per sample whose visible cells are disjoint (LUT, Kim et al. 2024): one random
    order of the cells per sample; view k sees the k-th run of v = cells - ceil(ratio * cells) cells
    of it, so each view alone is a uniform SimMIM mask. -> `views` x (N, rows, cols) bool, True = masked."""
    cells = rows * cols
    visible = cells - math.ceil(ratio * cells)
    if views * visible > cells:
        raise ValueError(f"{views} views with disjoint visible cells need ratio >= {1 - 1 / views:.2f}, got {ratio}")
    rank = torch.rand(n, cells, generator=gen, device=device).argsort(1).argsort(1)   # (N, cells)
    return [~((rank >= k * visible) & (rank < (k + 1) * visible)).view(n, rows, cols) for k in range(views)]


def upsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """(N, h, w) patch mask -> (N, h * factor, w * factor), e.g. 32-px patches to the stride-4 feature
    map of a ResNet stem (factor 8), where the model puts its mask token; or factor = patch to pixels."""
    return mask.repeat_interleave(factor, 1).repeat_interleave(factor, 2)
