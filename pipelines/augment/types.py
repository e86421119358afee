"""What the augment stage (engine.py's Augmenter) hands out: `AugmentOutput`, and with
return_params=True the parameters drawn for each view (`ViewParams`) and for the mixed view (`MixParams`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from pipelines.augment import masks as M


@dataclass
class AugmentOutput:
    views: list[torch.Tensor]                   # float (N, 3, S_v, S_v) channels-last, normalised
    pairs: list[tuple[int, int]]                # multi-crop: i is a global view in every pair
    groups: list[list[int]] = field(default_factory=list)   # view indices per size, largest first
    mixed: Optional[torch.Tensor] = None        # views[mix_source] mixed with its reversed batch
    mix_lam: Optional[torch.Tensor] = None      # (N,) fraction of each mixed image from itself
    mix_source: Optional[int] = None
    mim_masks: Optional[list[Optional[torch.Tensor]]] = None   # (N, H/p, W/p) bool, True = masked
    params: Optional[list["ViewParams"]] = None  # per view, what was drawn (aug(views, return_params=True))
    mix_params: Optional["MixParams"] = None


@dataclass
class ViewParams:
    """What the stage drew for one output view: per-sample tensors (N leading, on the device).

    Replaying them reproduces the view (tests/test_augment_replay.py does, with
    torchvision.transforms.v2.functional). Sample i of loader view `source`, as float [0, 1]
    (to_dtype(scale=True)):

        flip[i]          horizontal_flip
        jitter[i]        for op in jitter_order[i]: adjust_brightness / contrast / saturation / hue
                         (op ids ops.BRIGHTNESS, CONTRAST, SATURATION, HUE) by jitter_factors[i, op]
        grayscale[i]     rgb_to_grayscale(img, 3)
        blur[i]          gaussian_blur(img, [blur_kernel] * 2, [blur_sigma[i]] * 2)
        solarize[i]      solarize(img, solarize_threshold)
        then             normalize(img, mean, std); with a high-pass (highpass_sigma not None):
                         normalize(img - gaussian_blur(img, [highpass_kernel] * 2, [highpass_sigma[i]] * 2),
                         0, std)
        masked[i]        the elements of mask_pixels()[i] replaced by the fill (mask_fill; the noise
                         values themselves are not kept)

    Ops a branch does not have read all False (jitter_factors the identity 1, 1, 1, 0)."""
    branch: int
    source: int                                  # the loader view (crop) it was made from
    size: int
    flip: torch.Tensor                           # (N,) bool
    jitter: torch.Tensor                         # (N,) bool
    jitter_factors: torch.Tensor                 # (N, 4) brightness, contrast, saturation factor, hue shift
    jitter_order: torch.Tensor                   # (N, 4) int64: op id in each of the four slots
    grayscale: torch.Tensor                      # (N,) bool
    blur: torch.Tensor                           # (N,) bool
    blur_sigma: Optional[torch.Tensor]           # (N,) px at this view's size (None: no blur op)
    blur_kernel: int
    solarize: torch.Tensor                       # (N,) bool
    solarize_threshold: float
    highpass_sigma: Optional[torch.Tensor]       # (N,) px (None: no high-pass)
    highpass_kernel: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    masked: torch.Tensor                         # (N,) bool: this copy masked at all
    mask_cells: Optional[torch.Tensor] = None    # (N, 3, Gmax, Gmax) bool, sample i uses its grid[i] block
    mask_grid: Optional[torch.Tensor] = None     # (N,) int64 cells per side
    mask_fill: Optional[str] = None
    noise_std: float = 0.0
    mim_mask: Optional[torch.Tensor] = None      # (N, H/p, W/p) bool (SimMIM)

    def mask_pixels(self) -> Optional[torch.Tensor]:
        """(N, 3, H, W) bool, True where the fill replaced the view's pixels (None: no mask op)."""
        if self.mask_cells is None:
            return None
        return M.cells_to_pixels(self.mask_cells, self.mask_grid, self.size, self.size, torch.bool)


@dataclass
class MixParams:
    """What was drawn for the mixed view: view `view` mixed with `view` of the reversed batch."""
    kind: str                                    # mixmask | unmix
    view: int
    lam: torch.Tensor                            # (N,) = AugmentOutput.mix_lam
    cells: Optional[torch.Tensor] = None         # MixMask: (N, 1, G, G) bool, True = from the reversed batch
    use_mixup: Optional[torch.Tensor] = None     # Un-Mix: (N,) bool, mixup (else cutmix)
    mixup_lam: Optional[torch.Tensor] = None     # Un-Mix: (N,) the Beta draw
    boxes: Optional[torch.Tensor] = None         # Un-Mix: (N, 4) cutmix box top, bottom, left, right
