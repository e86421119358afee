"""Batched image ops for the augment stage: one call transforms a whole batch, each sample with its own
parameters, on the training device.

Images are float (N, 3, H, W) in [0, 1] until `normalize`/`highpass` move them to the network's
input space; per-sample parameters are (N,) tensors on the same device. The ops take any memory
layout. The augmenter computes in the planar (contiguous) one, where a channel is a dense plane
(the colour ops read and reduce channels, several times faster on planes than on channels-last
pixels on CPU), and writes channels-last outputs. Every colour op follows
torchvision.transforms.v2.functional on float images, parameter for parameter
(tests/test_augment.py compares them sample by sample):

    brightness  clamp(f * x)                            (blend with black)
    contrast    clamp(f * x + (1 - f) * mean(gray(x)))   (blend with the mean of the grayscale image)
    saturation  clamp(f * x + (1 - f) * gray(x))         (blend with the grayscale image)
    hue         RGB -> HSV, h = (h + shift) mod 1, HSV -> RGB
    grayscale   ITU-R 601-2 luma, 0.2989 R + 0.587 G + 0.114 B, repeated on 3 channels
    solarize    x >= threshold ? 1 - x : x
    blur        separable gaussian, reflect padding; kernel exp(-t^2 / 2 sigma^2), t = -(k-1)/2..(k-1)/2

Random application ("with probability p") is realised by the caller (pipelines/augment/engine.py) as a
random subset of the batch, and ops that are expensive run on that subset only (`apply_to`):
index the rows, transform them, write them back. Subsets have a size fixed before the device is
touched (`subset_size`), so nothing here waits for the GPU.

Selections are arithmetic (multiply by 0/1 floats, lerp) rather than torch.where / masked_fill:
on CPU those run at a fraction of the speed of a multiply-add, and lerp is exact at weights 0 and 1.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)     # torchvision's rgb_to_grayscale (ITU-R 601-2)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CL = torch.channels_last

# colour-jitter op ids, the order torchvision's ColorJitter draws them from
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3


# ---- constants and dtype --------------------------------------------------------------------------

def const(values: tuple, device: torch.device | str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small constant tensor on a device, made once: building it per call would copy it from the
    host each time, and a blocking host-to-device copy waits for the GPU's queue. Inside a
    torch.compile'd function (fused.py) a constant of the compiled graph instead."""
    if torch.compiler.is_compiling():
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_const(values, torch.device(device), dtype)


@functools.lru_cache(maxsize=256)
def _cached_const(values: tuple, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def to_float(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, 3, H, W), any layout -> planar dtype in [0, 1] (torchvision's to_dtype(scale=True))."""
    if x.dtype != torch.uint8:
        raise TypeError(f"augment expects uint8 images from the loader, got {x.dtype}")
    return x.to(dtype, memory_format=torch.contiguous_format).mul_(1.0 / 255.0)


# ---- random parameters ----------------------------------------------------------------------------

def uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> torch.Tensor:
    """(n,) float32 uniform in [lo, hi) on the generator's device."""
    return torch.rand(n, generator=gen, device=device).mul_(hi - lo).add_(lo)


def subset_size(p: float, n: int, host_gen: torch.Generator) -> int:
    """How many of n samples an op with probability p touches in this batch: p * n, stochastically
    rounded with the host generator, so each sample's chance is exactly p and the count is known on
    the host without reading anything back from the device."""
    whole = math.floor(p * n)
    frac = p * n - whole
    return whole + int(frac > 0 and torch.rand(1, generator=host_gen).item() < frac)


def random_subset(n: int, k: int, gen: torch.Generator, device) -> Optional[torch.Tensor]:
    """k distinct sample indices, sorted (memory order), as an int64 tensor; None when k == 0."""
    if k <= 0:
        return None
    if k >= n:
        return torch.arange(n, device=device)
    return torch.randperm(n, generator=gen, device=device)[:k].sort().values


def subset_mask(n: int, idx: Optional[torch.Tensor], device) -> torch.Tensor:
    """(n,) bool, True at idx."""
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if idx is not None:
        mask[idx] = True
    return mask


def apply_to(x: torch.Tensor, idx: Optional[torch.Tensor], fn: Callable[..., torch.Tensor],
             *params: torch.Tensor) -> torch.Tensor:
    """x[idx] = fn(x[idx], *(p[idx] for p in params)), in place; the whole batch without indexing
    when idx covers it. params are per-sample (N, ...) tensors."""
    if idx is None or idx.numel() == 0:
        return x
    if idx.numel() == x.shape[0]:
        x.copy_(fn(x, *params))
        return x
    x[idx] = fn(x[idx], *(p[idx] for p in params))
    return x


# ---- colour ---------------------------------------------------------------------------------------

def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2])


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 3, H, W): the luma on all three channels (RandomGrayscale)."""
    return grayscale(x).expand_as(x).contiguous()


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def blend(x: torch.Tensor, ref: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """clamp(factor * x + (1 - factor) * ref, 0, 1); factor (N,), ref broadcastable to x."""
    f = _per_sample(factor).to(x.dtype)
    return torch.addcmul(ref * (1.0 - f), x, f).clamp_(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(factor).to(x.dtype)).clamp_(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x).mean((1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each sample by shift (N,) turns, in [-0.5, 0.5], as torchvision does
    (RGB -> HSV, h = (h + shift) mod 1, HSV -> RGB), without materialising HSV.

    With v = max(r, g, b), c = v - min(r, g, b) (chroma) and h6 = 6 h, HSV -> RGB is
    channel_n = v - c * clamp(min(k, 4 - k), 0, 1), k = (n + h6) mod 6 with n = 5, 3, 1 for R, G, B:
    torchvision's sector table (v, p, q, t) written as one expression per channel. The sector of the
    hue (which channel is the maximum) is selected with 0/1 weights, mod 6 with floor.
    """
    maxc = x.amax(1, keepdim=True)                                       # (N, 1, H, W): v
    chroma = maxc - x.amin(1, keepdim=True)
    inv = chroma.clamp_min(1e-30).reciprocal_()                         # gray pixels: numerators are 0
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    is_r = (maxc == r).to(x.dtype)                                       # torchvision's tie order: r, g, b
    is_g = (maxc == g).to(x.dtype).mul_(1.0 - is_r)
    # 6 h = (g - b) / c, 2 + (b - r) / c or 4 + (r - g) / c when the maximum is r, g or b, i.e.
    # ((r - g) + is_r (g - b - (r - g)) + is_g (b - r - (r - g))) / c + 4 - 4 is_r - 2 is_g
    rg = r - g
    h6 = (rg + is_r * (g - b - rg) + is_g * (b - r - rg)).mul_(inv).add_(4.0)
    h6 = h6.sub_(is_r, alpha=4.0).sub_(is_g, alpha=2.0).add_(_per_sample(shift).to(x.dtype) * 6.0)
    n = const((5.0, 3.0, 1.0), x.device, x.dtype).view(1, 3, 1, 1)
    k = h6 + n                                                           # (N, 3, H, W), in (-3, 15)
    k -= torch.floor(k * (1.0 / 6.0)).mul_(6.0)
    w = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return torch.addcmul(maxc, chroma, w, value=-1.0).clamp_(0.0, 1.0)


def hue_groups(n: int, rotation: int = 0) -> list[tuple[int, int, int]]:
    """The hue slot of n jittered samples listed in a random order, as (slot, start, end): the
    samples at positions [start, end) of the list do hue in `slot`. The list is cut into four
    near-equal groups (bounds q * n // 4) and group q does hue in slot (q + rotation) % 4. The one
    grouping behind both `jitter_order` (the order each sample gets) and the augmenter's hue index
    (the samples `color_jitter` runs hue on in each slot), so the two cannot disagree."""
    bounds = [q * n // 4 for q in range(5)]
    return [((q + rotation) % 4, bounds[q], bounds[q + 1]) for q in range(4)]


def jitter_order(n: int, gen: torch.Generator, device, rotation: int = 0) -> torch.Tensor:
    """(n, 4) op id per slot for `color_jitter`: a uniformly random order of the four ops per sample.

    The hue slot is stratified: the n samples (taken in the order the caller listed them, which is
    random) are cut into four near-equal groups (`hue_groups`), group q puts hue in slot
    (q + rotation) % 4, and the other three ops fill the remaining slots in an independent random
    order. With a uniform random rotation every sample's order is uniform over the 24 permutations,
    as torchvision's randperm(4); the stratification makes each slot's hue work a quarter of the
    batch with a size known up front.
    """
    hue_slot = torch.empty(n, dtype=torch.long, device=device)                # (n,)
    for slot, start, end in hue_groups(n, rotation):
        hue_slot[start:end] = slot
    others = torch.rand(n, 3, generator=gen, device=device).argsort(1)     # (n, 3): B/C/S order
    j = torch.arange(3, device=device).expand(n, 3)
    slots = j + (j >= hue_slot[:, None]).long()                            # non-hue slots, in order
    order = torch.full((n, 4), HUE, dtype=torch.long, device=device)
    order.scatter_(1, slots, others)
    return order


def blend_slot(x: torch.Tensor, factor: torch.Tensor, use_gray: torch.Tensor, use_mean: torch.Tensor) -> torch.Tensor:
    """One colour-jitter slot for a batch whose samples do brightness, contrast or saturation:
    clamp(f x + (1 - f) ref), ref = use_gray * luma + use_mean * mean luma (both 0: brightness).
    factor, use_gray, use_mean: (N,) float."""
    gray = grayscale(x)                                                    # (N, 1, H, W)
    mean = gray.mean((1, 2, 3), keepdim=True)
    ref = gray * _per_sample(use_gray) + mean * _per_sample(use_mean)
    f = _per_sample(factor)
    return torch.addcmul(ref * (1.0 - f), x, f).clamp_(0.0, 1.0)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 hue_index: Optional[Sequence[Optional[torch.Tensor]]] = None) -> torch.Tensor:
    """ColorJitter with per-sample factors and op order.

    factors: (N, 4) brightness, contrast, saturation factors and hue shift (1, 1, 1, 0 = identity);
    order: (N, 4) op id in each of the four slots (a permutation of 0..3 per sample).
    hue_index: for each slot, the indices of the samples that do hue there (None = none). Without it
    they are found with nonzero(), which waits for the device; `jitter_order` callers know them.

    Brightness, contrast and saturation are one op (`blend_slot`), so a slot costs the same whatever
    mixture of the three its samples do; hue runs on its samples only.
    """
    n = x.shape[0]
    rows = torch.arange(n, device=x.device)
    ones = torch.ones(n, 1, dtype=factors.dtype, device=x.device)
    with_identity = torch.cat([factors[:, :3], ones], 1).to(x.dtype)      # hue slot: blend factor 1
    for slot in range(4):
        op = order[:, slot]
        x = blend_slot(x, with_identity[rows, op], (op == SATURATION).to(x.dtype), (op == CONTRAST).to(x.dtype))
        idx = (op == HUE).nonzero().squeeze(1) if hue_index is None else hue_index[slot]
        if idx is not None and idx.numel():
            apply_to(x, idx, adjust_hue, factors[:, 3].to(x.dtype))
    return x


def solarize(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """x >= threshold ? 1 - x : x, as x + [x >= threshold] (1 - 2x)."""
    return torch.addcmul(x, (x >= threshold).to(x.dtype), 1.0 - 2.0 * x)


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)


# ---- blur and high-pass ---------------------------------------------------------------------------

def blur_kernel_size(size: int, fraction: float = 0.1) -> int:
    """SimCLR's kernel: `fraction` of the image side, made odd (23 px at 224, 3 px at 32)."""
    return max(3, int(round(fraction * size)) | 1)


def highpass_kernel_size(sigma: float, size: int) -> int:
    """2 * ceil(3 sigma) + 1 taps (the gaussian to 3 sigma), odd, and small enough for reflect padding."""
    return min(2 * math.ceil(3.0 * sigma) + 1, 2 * size - 1)


def gaussian_kernel1d(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(N,) sigmas -> (N, K) normalised taps, torchvision's kernel: exp(-t^2 / (2 sigma^2))."""
    t = torch.arange(kernel_size, dtype=torch.float32, device=sigma.device) - (kernel_size - 1) / 2
    w = torch.exp(-(t * t) / (2.0 * sigma.float()[:, None] ** 2))
    return w / w.sum(1, keepdim=True)


def _separable(x: torch.Tensor, taps: torch.Tensor, groups: int) -> torch.Tensor:
    """Depthwise gaussian along H then W, reflect padding; x (B, G, H, W), taps (G, K)."""
    k = taps.shape[1]
    p = k // 2
    wt = taps.to(x.dtype)
    y = F.conv2d(F.pad(x, (0, 0, p, p), mode="reflect"), wt.view(groups, 1, k, 1), groups=groups)
    return F.conv2d(F.pad(y, (p, p, 0, 0), mode="reflect"), wt.view(groups, 1, 1, k), groups=groups)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor | float, kernel_size: int) -> torch.Tensor:
    """Gaussian blur, separable, reflect padding (torchvision's gaussian_blur with a square kernel).

    sigma: a float (one kernel for all) or (N,) per sample. The N*C planes become the groups of one
    depthwise conv over a (1, N*C, H, W) view, which oneDNN runs about twice as fast as the same
    kernel over (N, C, H, W) with C groups. -> planar (N, C, H, W)."""
    n, c, h, w = x.shape
    if kernel_size // 2 >= min(h, w):
        raise ValueError(f"blur kernel {kernel_size} too large for {h}x{w} images (reflect padding)")
    if isinstance(sigma, torch.Tensor):
        taps = gaussian_kernel1d(sigma, kernel_size).repeat_interleave(c, 0)      # (N*C, K)
    else:
        taps = gaussian_kernel1d(torch.full((1,), float(sigma), device=x.device), kernel_size).expand(n * c, -1)
    return _separable(x.reshape(1, n * c, h, w), taps.contiguous(), n * c).reshape(n, c, h, w)


def highpass(x: torch.Tensor, sigma: torch.Tensor | float, kernel_size: int) -> torch.Tensor:
    """MSCN's high-pass filter: x - gaussian_blur(x). Zero means "no information" afterwards."""
    return x - gaussian_blur(x, sigma, kernel_size)


# ---- normalisation --------------------------------------------------------------------------------

def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel, as one fused multiply-add."""
    scale = const(tuple(1.0 / s for s in std), x.device, x.dtype).view(1, -1, 1, 1)
    bias = const(tuple(-m / s for m, s in zip(mean, std)), x.device, x.dtype).view(1, -1, 1, 1)
    return torch.addcmul(bias, x, scale)
