"""MixMAE's ConvNet variant (Liu et al. 2023, A.3 and Figure 1): reconstruct two images from their mix.

The augment stage draws one patch mask per image (a recipe with `simmim: {patch: 32, ratio: 0.5}`,
recipe mixmae; out.mim_masks[0], True = the patch comes from the partner). Image i is mixed with
its partner, the reversed batch's image N-1-i (as MixMask): x_mix = where(mask, x.flip(0), x), so
each patch comes from exactly one of the two; the mixing is deterministic, the randomness stays in
the augment stage.

The encoder is the backbone run with mixed partial convolution (models/mim.py SourceEncoder.mixed):
each conv, pool and BatchNorm computes at a position only from positions of the same source,
renormalised by their count, so the features of one image never depend on the other's pixels. At
stride 32 a position is one 32 px patch of one source. The decoder (PixelDecoder, `decoder_depth`
3x3 conv blocks, pixel-shuffled) runs twice on those features: for the image itself with the
partner's positions replaced by its mask token, and for the partner with the image's positions
replaced. Dual reconstruction: each decode is scored on the pixels its image hid, l2 on per-patch
normalised pixels (MixMIM's norm-pix loss; `norm_pix_loss`), averaged over the hidden pixels of both.
With `lut_weight` > 0, LUT's broader-context term for each image's pooled features (losses/lut.py;
recipe mixmae_lut: two crops, each mixed, their own cells complementary; both reconstructed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from losses import lut as lut_term
from losses.common import defaults
from losses.simmim import check_patch, masked_pixel_loss, masked_views, mim_masks, patch_normalize
from models.mim import PixelDecoder, SourceEncoder, encoder_stride, expand_mask


@dataclass(frozen=True)
class Settings(lut_term.LUTSettings):
    decoder_depth: int = 2                 # 3x3 conv blocks before the pixel head
    decoder_dim: int = 512                 # their width
    norm_pix_loss: bool = True             # target: per-patch normalised pixels (MixMIM)
    RULES: ClassVar = {"decoder_depth": (lambda v: v >= 1, ">= 1 (the decoder fills the other image's positions)"),
                       "decoder_dim": (lambda v: v > 0, "> 0")}


SHAPE_KEYS = ("decoder_depth", "decoder_dim") + lut_term.SHAPE_KEYS


class MixMAE(nn.Module):
    name, Settings = "mixmae", Settings
    DEFAULTS = defaults(Settings)
    SHAPE_KEYS = SHAPE_KEYS

    def __init__(self, backbone: nn.Module, hp: dict[str, Any], cfg=None):
        super().__init__()
        self.hp = hp
        self.backbone = backbone
        self.stride = encoder_stride(backbone)
        self.decoder = PixelDecoder(backbone.num_features, self.stride, hp["decoder_depth"], hp["decoder_dim"])
        self.lut = lut_term.BroaderContext(backbone, hp) if hp["lut_weight"] > 0 else None

    def reconstruct(self, out, view: int = 0) -> dict[str, Any]:
        """input x (N, 3, H, W); partner x.flip(0); mask (N, 1, H, W) bool, True = from the partner;
        mixed (N, 3, H, W); pred (2N, 3, H, W): rows :N the images, N: the partners; hidden
        (2N, 1, H, W): the pixels each row is scored on; pooled (2N, F), each image's own positions;
        patch (px); of view `view`."""
        x = out.views[view]
        cells = mim_masks(out, self.name, view)
        patch = x.shape[2] // cells.shape[1]
        check_patch(patch, self.stride, self.name, "the encoder's stride: one feature position, one source")
        mask = expand_mask(cells, x.shape[2], x.shape[3])[:, None]
        partner = x.flip(0)
        mixed = torch.where(mask, partner, x)
        enc = SourceEncoder.mixed(cells)
        f = enc(self.backbone, mixed)                                 # (N, F, h, w)
        at_f = expand_mask(cells, f.shape[2], f.shape[3])
        # one decoder pass for both: the image with its partner's positions hidden, and vice versa
        pred = self.decoder(torch.cat([f, f]), torch.cat([at_f, ~at_f]))
        pooled = enc.pool(f)                                          # (2, N, F): own, partner
        return {"input": x, "partner": partner, "mask": mask, "mixed": mixed, "pred": pred,
                "hidden": torch.cat([mask, ~mask]), "pooled": pooled.flatten(0, 1), "patch": patch}

    def forward(self, out) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # every masked view mixed and reconstructed (LUT: both crops), its own forward; losses averaged
        losses, pooled = [], {}
        for k in masked_views(out):
            r = self.reconstruct(out, k)
            target = torch.cat([r["input"], r["partner"]])
            if self.hp["norm_pix_loss"]:
                target = patch_normalize(target, r["patch"])
            losses.append(masked_pixel_loss(r["pred"], target, r["hidden"], "l2"))
            pooled[k] = r["pooled"]
        mim = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        return lut_term.total_loss(self.lut, self.hp["lut_weight"], mim, pooled, out, self.name, partner=True)

    def after_step(self, step: int, total_steps: int) -> None:
        if self.lut is not None:
            self.lut.after_step(self.backbone, step, total_steps)
