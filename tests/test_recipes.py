"""Recipes and the Augmenter (pipelines/augment/recipes.py): every built-in recipe runs; the whole pipeline
equals torchvision for recipes whose randomness is pinned; probabilities, masks and mixing hold
through it; same seed same output, resume from state_dict; clear errors for bad recipes."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from conftest import skimage_photos
from pipelines.augment import ops as A
from pipelines.augment.engine import Augmenter, build_augmenter
from pipelines.augment.recipes import RecipeError, load_recipe, recipe_names

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
MEAN, STD = torch.tensor(A.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(A.IMAGENET_STD).view(1, 3, 1, 1)
_PHOTOS = []


def photo_views(n: int, size: int, sources: int = 2, seed: int = 0, device="cpu") -> list[torch.Tensor]:
    """`sources` views of n real-photo crops, (N, 3, size, size) uint8 channels-last, as a loader gives."""
    if not _PHOTOS:
        _PHOTOS.extend(skimage_photos())
    rng = np.random.default_rng(seed)
    views = []
    for _ in range(sources):
        crops = []
        for _ in range(n):
            p = _PHOTOS[rng.integers(len(_PHOTOS))]
            h, w = p.shape[:2]
            side = int(rng.integers(min(h, w) // 3, min(h, w) + 1))
            top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            img = Image.fromarray(p[top:top + side, left:left + side]).resize((size, size), Image.BILINEAR)
            crops.append(torch.from_numpy(np.array(img)))
        views.append(torch.stack(crops).to(device).permute(0, 3, 1, 2))        # NHWC -> NCHW channels-last
    return views


def write_recipe(tmp_path, text: str, name: str = "r") -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def denorm(v: torch.Tensor) -> torch.Tensor:
    return v.float().cpu() * STD + MEAN


# ---- the built-in recipes -------------------------------------------------------------------------

def test_builtin_recipes_say_what_the_papers_say():
    assert {"simclr", "byol", "mocov2", "mscn", "mscn_byol", "mixmask", "unmix", "simmim"} <= set(recipe_names())
    simclr = load_recipe("simclr")
    c = simclr.branches[0].color
    assert (c.p, c.brightness, c.contrast, c.saturation, c.hue) == (0.8, 0.8, 0.8, 0.8, 0.2)
    assert simclr.branches[1].grayscale == 0.2 and simclr.branches[1].blur.p == 0.5
    assert simclr.pairs == ((0, 1),) and simclr.sources == 2
    byol = load_recipe("byol")
    assert [b.blur.p for b in byol.branches] == [1.0, 0.1]
    assert [b.solarize.p if b.solarize else 0.0 for b in byol.branches] == [0.0, 0.2]
    assert byol.branches[0].color.saturation == 0.2
    mscn = load_recipe("mscn")
    a, b = mscn.branches
    assert a.color == simclr.branches[0].color and a.highpass.sigma == (5.0, 5.0)
    assert (a.copies, b.copies, a.mask.p, b.mask.p) == (2, 1, 1.0, 0.5)
    assert a.mask.ratio == (0.15, 0.15) and a.mask.grid == (7, 8) and a.mask.focal == 0.4
    assert a.mask.channelwise == 0.8 and a.mask.noise_std > b.mask.noise_std
    assert mscn.pairs == ((0, 2), (1, 2)) and mscn.view_branches() == [0, 0, 1]
    assert load_recipe("mscn_byol").branches[1].solarize.p == 0.2
    mix = load_recipe("mixmask").mix
    assert (mix.kind, mix.grid, mix.ratio, mix.branch) == ("mixmask", 8, 0.5, 0)
    unmix = load_recipe("unmix").mix
    assert (unmix.kind, unmix.mixup_p, unmix.beta) == ("unmix", 0.5, 1.0)
    simmim = load_recipe("simmim")
    assert simmim.sources == 1 and simmim.pairs == () and (simmim.simmim.patch, simmim.simmim.ratio) == (32, 0.6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["simclr", "byol", "mocov2", "mscn", "mscn_byol", "mixmask", "unmix"])
def test_every_recipe_runs(device, name):
    aug = build_augmenter(name, size=32, device=device, dtype=torch.bfloat16, seed=1)
    views = photo_views(6, 32, aug.sources, device=device)
    out = aug(views)
    assert len(out.views) == len(aug.recipe.view_branches())
    for v in out.views:
        assert v.shape == (6, 3, 32, 32) and v.dtype == torch.bfloat16 and v.device.type == device
        assert v.is_contiguous(memory_format=torch.channels_last) and torch.isfinite(v.float()).all()
    assert out.pairs == list(aug.recipe.pairs) and out.mim_masks is None
    if aug.recipe.mix:
        assert out.mixed.shape == out.views[0].shape and out.mixed.dtype == torch.bfloat16
        assert out.mix_lam.shape == (6,) and out.mix_source == 0
        assert ((out.mix_lam >= 0) & (out.mix_lam <= 1)).all()
    else:
        assert out.mixed is None and out.mix_lam is None


def test_simmim_recipe(tmp_path):
    with pytest.raises(RecipeError, match="not a multiple of the SimMIM patch 32"):
        build_augmenter("simmim", size=48)
    small = write_recipe(tmp_path, "base: simmim\nsimmim: {patch: 8}\n")
    aug = build_augmenter(small, size=64, seed=0)
    (x,) = photo_views(10, 64, 1)
    out = aug([x])
    (mask,) = out.mim_masks
    assert mask.shape == (10, 8, 8) and (mask.sum((1, 2)) == math.ceil(0.6 * 64)).all()
    # the image itself is only normalised: the model replaces masked positions after its stem
    ref = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), list(A.IMAGENET_MEAN), list(A.IMAGENET_STD))
    torch.testing.assert_close(out.views[0], ref, atol=1e-6, rtol=0)


# ---- the pipeline equals torchvision where its randomness is pinned -------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_pinned_recipes_equal_torchvision(tmp_path, device):
    (x,) = photo_views(5, 48, 1, device=device)
    xf = TF.to_dtype(x, torch.float32, scale=True)
    norm = lambda t: TF.normalize(t, list(A.IMAGENET_MEAN), list(A.IMAGENET_STD))   # noqa: E731
    scale = 48 / 224
    cases = {
        "branches: [{grayscale: 1.0}]": norm(TF.rgb_to_grayscale(xf, 3)),
        "branches: [{solarize: {p: 1.0, threshold: 0.4}}]": norm(TF.solarize(xf, 0.4)),
        "branches: [{blur: {p: 1.0, sigma: 7.0, kernel: 0.2}}]":
            norm(TF.gaussian_blur(xf, [A.blur_kernel_size(48, 0.2)] * 2, [7.0 * scale] * 2)),
        "branches: [{highpass: {sigma: 14.0}}]":
            TF.normalize(xf - TF.gaussian_blur(xf, [A.highpass_kernel_size(14 * scale, 48)] * 2, [14 * scale] * 2),
                         [0.0] * 3, list(A.IMAGENET_STD)),
        "branches: [{color: {p: 1.0, brightness: 0.0, contrast: 0.0, saturation: 0.0, hue: 0.0}}]": norm(xf),
        "branches: [{flip: 1.0}]\nnormalize: {mean: [0.5, 0.5, 0.5], std: [0.25, 0.25, 0.25]}":
            TF.normalize(TF.horizontal_flip(xf), [0.5] * 3, [0.25] * 3),
    }
    for i, (text, ref) in enumerate(cases.items()):
        aug = build_augmenter(write_recipe(tmp_path, text + "\npairs: []\n", f"case{i}"), size=48, device=device)
        torch.testing.assert_close(aug([x]).views[0], ref, atol=2e-5, rtol=0, msg=text)


def test_color_jitter_factors_stay_in_their_ranges(tmp_path):
    # brightness only: each output is the input times one factor in [0.6, 1.4] (before clipping)
    path = write_recipe(tmp_path, "branches: [{color: {p: 1.0, brightness: 0.4, contrast: 0.0, "
                                  "saturation: 0.0, hue: 0.0}}]\npairs: []\n")
    aug = build_augmenter(path, size=32)
    factors = []
    for seed in range(10):
        (x,) = photo_views(16, 32, 1, seed=seed)
        xf = TF.to_dtype(x, torch.float32, scale=True)
        y = denorm(aug([x]).views[0])
        ok = (xf > 0.05) & (y < 0.999)                                 # away from 0 and the clip
        f = torch.stack([(y[i][ok[i]] / xf[i][ok[i]]).median() for i in range(16)])
        factors.append(f)
    f = torch.cat(factors)
    assert f.min() >= 0.6 - 1e-3 and f.max() <= 1.4 + 1e-3
    assert abs(f.mean().item() - 1.0) < 0.05 and f.std().item() > 0.15           # uniform: std 0.23


def test_probabilities_hold_through_the_augmenter(tmp_path):
    path = write_recipe(tmp_path, "branches: [{grayscale: 0.3, solarize: {p: 0.2, threshold: 0.5}, "
                                  "blur: {p: 0.5, sigma: [0.5, 2.0]}}]\npairs: []\n")
    aug = build_augmenter(path, size=32, seed=0)
    gray, solar, sigmas, blurred = [], [], [], []
    (x,) = photo_views(10, 32, 1)
    for seed in range(40):
        (p,) = aug([x], return_params=True).params
        gray.append(int(p.grayscale.sum()))
        solar.append(int(p.solarize.sum()))
        blurred.append(int(p.blur.sum()))
        sigmas.append(p.blur_sigma)
    sigma = torch.cat(sigmas) * 224 / 32
    assert abs(np.mean(gray) / 10 - 0.3) < 0.03 and abs(np.mean(solar) / 10 - 0.2) < 0.03
    assert abs(np.mean(blurred) / 10 - 0.5) < 0.03
    assert sigma.min() >= 0.5 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.25) < 0.05
    # and in the pixels: a grayscaled colour photo has three equal channels
    hits, colour = 0, 0
    for seed in range(20):
        (x,) = photo_views(10, 32, 1, seed=seed)
        is_colour = (x[:, 0] != x[:, 1]).flatten(1).any(1)
        y = denorm(aug([x]).views[0])
        hits += int((((y[:, 0] - y[:, 1]).abs().amax((1, 2)) < 1e-5) & is_colour).sum())
        colour += int(is_colour.sum())
    assert abs(hits / colour - 0.3) < 0.1


# ---- MSCN masks and mixing through the augmenter --------------------------------------------------

def test_mscn_masks_are_asymmetric_and_multi(tmp_path):
    # zero fill without the high-pass filter makes the masked elements visible: exact zeros (an
    # unmasked pixel would have to equal the dataset mean exactly; a high-passed one is 0 wherever
    # the image is flat)
    path = write_recipe(tmp_path, "base: mscn\ncommon: {highpass: null, mask: {fill: zero}}\n")
    aug = build_augmenter(path, size=64, seed=3)
    masked_b, frac_a = [], []
    for seed in range(6):
        out = aug(photo_views(16, 64, 2, seed=seed))
        a0, a1, b = (v.float() for v in out.views)
        zero_a0, zero_a1, zero_b = (a0 == 0), (a1 == 0), (b == 0)
        assert zero_a0.flatten(1).any(1).all() and zero_a1.flatten(1).any(1).all()   # branch A: always
        masked_b.append(zero_b.flatten(1).any(1).float())
        frac_a.append(zero_a0.float().mean((1, 2, 3)))
        # the two masked copies of branch A share their image: equal wherever neither is masked
        both = ~zero_a0 & ~zero_a1
        assert torch.equal(a0[both], a1[both]) and not torch.equal(zero_a0, zero_a1)
    assert abs(torch.cat(masked_b).mean().item() - 0.5) < 0.1                        # branch B: p = 0.5
    frac = torch.cat(frac_a)
    # grid masks hide 15% of the cells, focal masks keep a square of 0.5-0.8 of the side
    assert 0.1 < frac.min() and frac.max() < 0.8 and 0.2 < frac.mean() < 0.45


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["mixmask", "unmix"])
def test_mixed_view_and_lam_agree(device, name):
    aug = build_augmenter(name, size=32, device=device, seed=2)
    out = aug(photo_views(8, 32, 2, device=device))
    v, m, lam = out.views[out.mix_source], out.mixed, out.mix_lam
    rev = v.flip(0)
    differ = (v != rev).all(1)                                         # pixels where the two tell apart
    own = (m == v).all(1) & differ
    other = (m == rev).all(1) & differ
    if name == "mixmask":
        assert (own | other)[differ].all()                             # every pixel from one of the two
        torch.testing.assert_close(own.float().sum((1, 2)) / differ.float().sum((1, 2)), lam, atol=0.02, rtol=0)
        assert torch.allclose(lam, torch.full_like(lam, 0.5))
    else:
        kinds = set()
        for i in range(8):
            if (own[i] | other[i])[differ[i]].all():                   # cutmix: copies from one or the other
                kinds.add("cutmix")
                torch.testing.assert_close(own[i].float().sum() / differ[i].float().sum(), lam[i], atol=0.02, rtol=0)
            else:                                                      # mixup: the lam blend everywhere
                kinds.add("mixup")
                torch.testing.assert_close(m[i], lam[i] * v[i] + (1 - lam[i]) * rev[i], atol=1e-5, rtol=0)
        assert kinds == {"cutmix", "mixup"}


def test_build_augmenter_adds_the_configs_mixing():
    assert build_augmenter("simclr", 32, mix="none").recipe.mix is None
    out = build_augmenter("simclr", 32, mix="unmix")(photo_views(4, 32))
    assert out.mixed is not None and out.mix_source == 0
    assert build_augmenter("mixmask", 32, mix="mixmask").recipe.mix.grid == 8
    with pytest.raises(RecipeError, match="mix 'cutout'"):
        build_augmenter("simclr", 32, mix="cutout")


# ---- randomness, resume, chunking ----------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_output_and_resume(device):
    views = photo_views(6, 32, 2, device=device)
    a = build_augmenter("mscn", 32, device=device, seed=5, rank=1)
    b = build_augmenter("mscn", 32, device=device, seed=5, rank=1)
    for x, y in zip(a(views).views, b(views).views):
        assert torch.equal(x, y)
    other_seed = build_augmenter("mscn", 32, device=device, seed=6, rank=1)(views).views[0]
    other_rank = build_augmenter("mscn", 32, device=device, seed=5, rank=2)(views).views[0]
    first = build_augmenter("mscn", 32, device=device, seed=5, rank=1)(views).views[0]
    assert not torch.equal(first, other_seed) and not torch.equal(first, other_rank)
    # resume: a state saved after one batch reproduces the second batch exactly
    state = a.state_dict()
    expect = a(views)
    c = build_augmenter("mscn", 32, device=device, seed=0)
    c.load_state_dict(state)
    got = c(views)
    for x, y in zip(expect.views, got.views):
        assert torch.equal(x, y)
    mixer = build_augmenter("unmix", 32, device=device, seed=0)
    s = mixer.state_dict()
    lam = mixer(views).mix_lam
    mixer.load_state_dict(s)
    assert torch.equal(mixer(views).mix_lam, lam)


def test_chunking_and_workers_do_not_change_the_result():
    views = photo_views(7, 32, 2)
    for name in ("simclr", "byol"):                                    # no noise: chunking is invisible
        whole = build_augmenter(name, 32, seed=0, chunk=7)(views).views
        for chunk in (1, 3):
            for x, y in zip(whole, build_augmenter(name, 32, seed=0, chunk=chunk)(views).views):
                torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    threads = torch.get_num_threads()
    try:                                                               # MSCN noise: seeded per chunk
        torch.set_num_threads(2)
        pooled = build_augmenter("mscn", 32, seed=0, chunk=2)
        torch.set_num_threads(1)
        inline = build_augmenter("mscn", 32, seed=0, chunk=2)
    finally:
        torch.set_num_threads(threads)
    assert pooled._pool is not None and inline._pool is None
    for x, y in zip(pooled(views).views, inline(views).views):
        assert torch.equal(x, y)


# ---- eval transform ------------------------------------------------------------------------------

def test_eval_transform():
    """eval.common.EvalTransform against torchvision: MSCN's high-pass at the midpoint sigma scaled to
    the image, or the recipe's mean / std; more rows than one CPU chunk (the worker pool runs them)."""
    from eval.common import EvalTransform
    (x,) = photo_views(4, 64, 1)
    x = torch.cat([x] * 40)                     # 160 rows: 4 CPU chunks (default_chunk: 53 rows at 64 px)
    xf = TF.to_dtype(x, torch.float32, scale=True)
    mscn = EvalTransform("mscn")
    sigma = 5.0 * 64 / 224
    k = A.highpass_kernel_size(sigma, 64)
    ref = TF.normalize(xf - TF.gaussian_blur(xf, [k, k], [sigma, sigma]), [0.0] * 3, list(A.IMAGENET_STD))
    out = mscn(x)
    assert out.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=0)
    plain = TF.normalize(xf, list(A.IMAGENET_MEAN), list(A.IMAGENET_STD))
    torch.testing.assert_close(EvalTransform("mscn", highpass=False)(x), plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(EvalTransform("simclr")(x), plain, atol=1e-6, rtol=0)
    assert EvalTransform("simclr", dtype=torch.bfloat16)(x).dtype == torch.bfloat16
    assert EvalTransform(load_recipe("simclr"), highpass=True).highpass


# ---- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,match", [
    ("branches: [{colour: 0.5}]", r"branches\[0\]: unknown key\(s\) colour; valid keys: source, copies"),
    ("branches: [{blur: {p: 1.5}}]", r"branches\[0\]\.blur\.p: a probability must be in \[0, 1\]"),
    ("branches: [{mask: {fill: paint}}]", "mask.fill: 'paint' is not one of zero, mean, noise"),
    ("branches: [{blur: {sigma: [2, 1]}}]", r"blur\.sigma: expected a number or a range \[lo, hi\]"),
    ("branches: [{}]\npairs: [[0, 1]]", r"pair \(0, 1\) does not name two different views of 1"),
    ("branches: []", "`branches` must be a non-empty list"),
    ("brnches: []", r"unknown key\(s\) brnches"),
    ("branches: [{}]\nmix: {kind: blend}", "mix.kind 'blend' is not one of mixmask, unmix"),
    ("base: nosuchrecipe\nbranches: [{}]", r"recipe .nosuchrecipe.: no file .* \(built-in recipes: byol"),
])
def test_bad_recipes_name_the_file_and_key(tmp_path, text, match):
    path = write_recipe(tmp_path, text, "bad")
    with pytest.raises(RecipeError, match=match) as err:
        load_recipe(path)
    assert "bad.yaml" in str(err.value) or "nosuchrecipe" in str(err.value)


def test_wrong_inputs_are_refused():
    aug = build_augmenter("simclr", 32)
    (x,) = photo_views(3, 32, 1)
    with pytest.raises(ValueError, match="needs 2 loader views"):
        aug([x])
    with pytest.raises(ValueError, match="built for size 32"):
        aug(photo_views(3, 48, 2))
    with pytest.raises(ValueError, match="uint8"):
        aug([x.float(), x.float()])
    with pytest.raises(RecipeError, match="built-in recipes"):
        build_augmenter("simclrr", 32)
    assert isinstance(aug, Augmenter) and aug.sources == 2


# ---- pipelines.tools.show (python -m pipelines.show) ------------------------------------------------

def test_show_draws_crops_views_and_the_mixed_view(image_folder, tmp_path):
    from pipelines.tools import show
    img = show.render("mixmask", str(image_folder), images=3, seed=0, size=32)
    cols = 2 + 2 + 1                                                    # crops, views, mixed
    assert img.size == (cols * (32 + show.GAP) + show.GAP, show.HEADER + 3 * (32 + show.GAP) + show.GAP)
    # a normalise-only view, de-normalised for display, is the crop again (to one grey level)
    plain = write_recipe(tmp_path, "branches: [{}]\npairs: []\n", "plain_show")
    img = np.asarray(show.render(plain, str(image_folder), images=2, seed=0, size=32, zoom=2)).astype(int)
    y0, tile = show.HEADER + show.GAP, 64
    crop = img[y0:y0 + tile, show.GAP:show.GAP + tile]
    view = img[y0:y0 + tile, 2 * show.GAP + tile:2 * show.GAP + 2 * tile]
    assert np.abs(crop - view).max() <= 1
    out = tmp_path / "views.png"
    show.main(["--recipe", "mscn", "--data", str(image_folder), "--out", str(out), "--images", "2",
               "--size", "32", "--colours", "64"])
    assert Image.open(out).size[1] == show.HEADER + 2 * (32 + show.GAP) + show.GAP
