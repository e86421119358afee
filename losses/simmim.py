"""SimMIM on a ResNet (Xie et al. 2022, section 5): reconstruct the masked patches' pixels from the rest.

The augment stage draws the mask (recipe `simmim`: 32 px patches, ratio 0.6; out.mim_masks[0],
(N, H/p, W/p), True = masked). The encoder (models/mim.py), `mim_encoder`:
    dense   SimMIM: a learnable token replaces the stem output (conv + max-pool, stride 4) at masked
            positions; the stages follow unchanged. `mim_fill` sets the masked pixels before the stem:
            zero (default) or mean keep every feature blind to them; none is SimMIM's (and
            openmixup's) ResNet, whose stem reads masked pixels across each patch border
    sparse  beyond the seed, SparK's masked dense convolution: the input and every conv / pool
            output re-masked, BatchNorm over visible positions only; hidden patches stay 0, so the
            decoder needs context (decoder_depth >= 1) and fills them with its mask token
The head: `decoder_depth` 0 is SimMIM's linear head, a 1x1 conv from the stride-32 features to
32*32*3 values, pixel-shuffled to the image (stride^2 * 3 in general); more adds 3x3 conv blocks.
The loss: l1 between the prediction and the normalised input (per-patch normalised with
`norm_pix_loss`) on masked pixels only, averaged over masked pixels and channels (SimMIM's code:
sum(|pred - x| m) / sum(m) / 3). With `lut_weight` > 0, LUT's broader-context term (losses/lut.py;
recipe simmim_lut: two crops masked with disjoint visible cells, both reconstructed, the loss their
mean).

Distributed: the recipe masks exactly ceil(ratio * cells) cells of every image, so every rank holds
the same number of masked pixels and its local mean is its share of the global one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from losses import lut as lut_term
from losses.common import defaults, full_precision, upcast
from masksiam.config import ConfigError
from models.mim import MaskTokenEncoder, PixelDecoder, SourceEncoder, encoder_stride, expand_mask, stem_stride


@dataclass(frozen=True)
class Settings(lut_term.LUTSettings):
    mim_encoder: Literal["dense", "sparse"] = "dense"   # mask token after the stem, or SparK-style
    mim_fill: Literal["none", "zero", "mean"] = "zero"  # dense: masked pixels before the stem
    decoder_depth: int = 0                 # 3x3 conv blocks before the pixel head (0 = linear)
    decoder_dim: int = 512                 # their width
    norm_pix_loss: bool = False            # target: per-patch normalised pixels (MAE)
    RULES: ClassVar = {"decoder_depth": (lambda v: v >= 0, ">= 0 (0 = the linear head)"),
                       "decoder_dim": (lambda v: v > 0, "> 0")}


SHAPE_KEYS = ("decoder_depth", "decoder_dim") + lut_term.SHAPE_KEYS


# ---- pure functions -------------------------------------------------------------------------------

@full_precision
def masked_pixel_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """pred, target (N, C, H, W); mask (N, 1, H, W) bool, True = the pixel is scored.
    l1: sum(|pred - target| m) / (sum(m) C); l2 the same with squared errors. Visible pixels get no gradient."""
    err = upcast(pred) - upcast(target).detach()
    err = err.abs() if kind == "l1" else err.square()
    m = mask.to(err.dtype)
    return (err * m).sum() / (m.sum() * err.shape[1]).clamp_min(1.0)


def patch_normalize(x: torch.Tensor, patch: int, eps: float = 1e-6) -> torch.Tensor:
    """MAE's normalised-pixel target: each patch x patch block minus its mean, over its std
    (over the block's pixels and channels). (N, C, H, W) -> same shape, float32."""
    n, c, h, w = x.shape
    b = upcast(x).reshape(n, c, h // patch, patch, w // patch, patch)
    mean = b.mean((1, 3, 5), keepdim=True)
    var = b.var((1, 3, 5), keepdim=True)
    return ((b - mean) / (var + eps).sqrt()).reshape(n, c, h, w)


def mim_masks(out, method: str, view: int = 0) -> torch.Tensor:
    """A view's patch mask (the first by default), or a ConfigError naming the recipe key."""
    if out.mim_masks is None or out.mim_masks[view] is None:
        raise ConfigError(f"method {method!r} needs patch masks on the first view: use a recipe with a "
                          f"`simmim:` section (config key 'recipe', e.g. simmim, mixmae, simmim_lut)")
    return out.mim_masks[view]


def masked_views(out) -> list[int]:
    """The views that carry a patch mask (each is reconstructed; LUT: both of its two crops)."""
    return [k for k, m in enumerate(out.mim_masks or []) if m is not None] or [0]


def visible_mean(f: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """f (N, F, h, w) pooled over the visible part of each image -> (N, F); mask (N, h', w') True =
    masked, at any resolution: each feature position weighs by the visible fraction of its area."""
    vis = (~mask)[:, None].to(f.dtype)
    if vis.shape[2:] != f.shape[2:]:
        if vis.shape[2] % f.shape[2] == 0:                                  # finer mask: area fraction
            vis = F.adaptive_avg_pool2d(vis, f.shape[2:])
        else:                                                               # coarser mask: each cell a block
            vis = expand_mask(~mask, f.shape[2], f.shape[3])[:, None].to(f.dtype)
    return (f * vis).sum((2, 3)) / vis.sum((2, 3)).clamp_min(1e-6)


def check_patch(patch: int, multiple: int, method: str, what: str) -> None:
    if patch % multiple:
        raise ConfigError(f"method {method!r}: the recipe's simmim.patch is {patch} px, which must be a multiple "
                          f"of {multiple} px ({what}); set simmim.patch in the recipe or change size / stem")


# ---- the method -----------------------------------------------------------------------------------

class SimMIM(nn.Module):
    name, Settings = "simmim", Settings
    DEFAULTS = defaults(Settings)
    SHAPE_KEYS = SHAPE_KEYS

    def __init__(self, backbone: nn.Module, hp: dict[str, Any], cfg=None):
        super().__init__()
        self.hp = hp
        self.backbone = backbone
        self.stride = encoder_stride(backbone)
        self.sparse = hp["mim_encoder"] == "sparse"
        if self.sparse and hp["decoder_depth"] == 0:
            raise ConfigError("mim_encoder=sparse leaves the masked patches without features, which a linear "
                              "head cannot reconstruct: set config key 'decoder_depth' >= 1")
        self.tokens = None if self.sparse else MaskTokenEncoder(backbone, hp["mim_fill"])
        self.decoder = PixelDecoder(backbone.num_features, self.stride, hp["decoder_depth"], hp["decoder_dim"],
                                    mask_token=self.sparse)
        self.lut = lut_term.BroaderContext(backbone, hp) if hp["lut_weight"] > 0 else None

    def reconstruct(self, out, view: int = 0) -> dict[str, Any]:
        """input (N, 3, H, W), mask (N, 1, H, W) bool (True = scored), pred (N, 3, H, W),
        pooled (N, F) features over the visible positions, patch (px); of view `view`."""
        x = out.views[view]
        mask = mim_masks(out, self.name, view)
        patch = x.shape[2] // mask.shape[1]
        if self.sparse:
            check_patch(patch, self.stride, self.name, "the sparse encoder's stride")
            enc = SourceEncoder.sparse(mask)
            f = enc(self.backbone, x)
            hide = expand_mask(mask, f.shape[2], f.shape[3])
            pooled = enc.pool(f)[0]                       # visible positions only
        else:
            check_patch(patch, stem_stride(self.backbone), self.name, "the stem's stride, where the token goes")
            f = self.tokens(self.backbone, x, mask)
            hide = None                                   # the encoder holds the token already
            pooled = visible_mean(f, mask)
        pred = self.decoder(f, hide)
        return {"input": x, "mask": expand_mask(mask, x.shape[2], x.shape[3])[:, None], "pred": pred,
                "pooled": pooled, "patch": patch}

    def forward(self, out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # every masked view reconstructed (LUT: both crops), its own forward; the losses averaged
        losses, pooled = [], {}
        for k in masked_views(out):
            r = self.reconstruct(out, k)
            target = patch_normalize(r["input"], r["patch"]) if self.hp["norm_pix_loss"] else r["input"]
            losses.append(masked_pixel_loss(r["pred"], target, r["mask"], "l1"))
            pooled[k] = r["pooled"]
        mim = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        return lut_term.total_loss(self.lut, self.hp["lut_weight"], mim, pooled, out, self.name)

    def after_step(self, step: int, total_steps: int) -> None:
        if self.lut is not None:
            self.lut.after_step(self.backbone, step, total_steps)
