"""The whole augment stage replayed sample by sample with torchvision.transforms.v2.functional from
the parameters it reports (`aug(views, return_params=True)`, pipelines/augment/types.py ViewParams).

Batch sizes 7, 13 and 29 make the jittered count (0.8 N, stochastically rounded) not a multiple of
4, where the per-sample jitter order and the hue index once split the samples differently. The
tolerance is the op-level one of tests/test_augment.py (hue 1e-5 on [0, 1]) carried through the
later ops and normalisation (/ std ~0.225): 1e-4 in normalised units.
"""
from __future__ import annotations

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pipelines.augment import ops as A
from pipelines.augment.engine import build_augmenter
from pipelines.augment.types import ViewParams
from test_recipes import photo_views

JITTER = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
TOL = 1e-4


def replay(views: list[torch.Tensor], p: ViewParams) -> torch.Tensor:
    """One output view from its drawn parameters, image by image with torchvision v2."""
    out = []
    for i in range(p.flip.shape[0]):
        img = TF.to_dtype(views[p.source][i].contiguous(), torch.float32, scale=True)
        if p.flip[i]:
            img = TF.horizontal_flip(img)
        if p.jitter[i]:
            for op in p.jitter_order[i].tolist():
                img = JITTER[op](img, float(p.jitter_factors[i, op]))
        if p.grayscale[i]:
            img = TF.rgb_to_grayscale(img, 3)
        if p.blur[i]:
            img = TF.gaussian_blur(img, [p.blur_kernel] * 2, [float(p.blur_sigma[i])] * 2)
        if p.solarize[i]:
            img = TF.solarize(img, p.solarize_threshold)
        if p.highpass_sigma is not None:
            s = float(p.highpass_sigma[i])
            img = TF.normalize(img - TF.gaussian_blur(img, [p.highpass_kernel] * 2, [s, s]), [0.0] * 3, list(p.std))
        else:
            img = TF.normalize(img, list(p.mean), list(p.std))
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize("name", ["simclr", "byol"])
def test_recipe_equals_torchvision_replayed_from_its_parameters(name):
    aug = build_augmenter(name, size=32, seed=4)
    not_multiple = 0
    for n in (7, 13, 29):
        views = photo_views(n, 32, aug.sources, seed=n)
        out = aug(views, return_params=True)
        assert len(out.params) == len(out.views)
        for v, p in zip(out.views, out.params):
            k = int(p.jitter.sum())
            not_multiple += k % 4 != 0
            assert (p.jitter_order.sort(1).values == torch.arange(4)).all()          # permutations
            torch.testing.assert_close(v, replay(views, p), atol=TOL, rtol=0,
                                       msg=f"{name}, batch {n}, {k} jittered")
    assert not_multiple >= 4                     # the case the test is about happened (k = 0.8 N)


def test_params_describe_the_draws():
    aug = build_augmenter("mscn", size=32, seed=0)
    views = photo_views(10, 32, 2)
    out = aug(views, return_params=True)
    assert [p.branch for p in out.params] == [0, 0, 1] and [p.source for p in out.params] == [0, 0, 1]
    a0, a1, b = out.params
    assert a0.masked.all() and a1.masked.all() and int(b.masked.sum()) == 5        # p = 1 and 0.5
    assert a0.mask_fill == "noise" and a0.noise_std == 0.5 and b.noise_std == 0.25
    assert not torch.equal(a0.mask_pixels(), a1.mask_pixels())                     # multi-mask
    torch.testing.assert_close(a0.highpass_sigma, torch.full((10,), 5.0 * 32 / 224))
    # unmasked pixels of the masked views are the high-passed base (replayed), masked ones differ
    for v, p in zip(out.views, out.params):
        keep = ~p.mask_pixels()
        torch.testing.assert_close(v[keep], replay(views, p)[keep], atol=TOL, rtol=0)
    assert aug(views).params is None                                              # only when asked
    mix = build_augmenter("mixmask", size=32, seed=0)(views, return_params=True).mix_params
    assert mix.kind == "mixmask" and mix.view == 0 and mix.cells.shape == (10, 1, 8, 8)
    unmix = build_augmenter("unmix", size=32, seed=0)(views, return_params=True)
    m = unmix.mix_params
    assert torch.equal(m.lam, unmix.mix_lam) and m.boxes.shape == (10, 4) and m.use_mixup.dtype == torch.bool
    torch.testing.assert_close(m.lam[m.use_mixup], m.mixup_lam[m.use_mixup])
