"""Batched augment ops (pipelines/augment/ops.py) against torchvision.transforms.v2.functional, sample by
sample with the same per-sample parameters, plus the random helpers behind them.

Tolerances (float32): the blends, grayscale, solarize, flip and normalise agree to 1e-6 (a rounding
or two apart); hue to 1e-5 (torchvision goes through HSV, we through one expression per channel);
blur to 1e-5 (separable vs torchvision's 2-D kernel, same taps). Each test runs on the CPU and, when
there is one, on CUDA (`gpu` marker).
"""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from pipelines.augment import ops as A

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
EXACT, HUE_TOL, BLUR_TOL = 1e-6, 1e-5, 1e-5


def images(n=6, h=20, w=24, device="cpu", seed=0) -> torch.Tensor:
    """float [0, 1] (N, 3, H, W) with the hard cases: gray pixels (chroma 0), saturated and clipped
    values, ties between channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    x[0, :, :4] = 0.5                                        # gray: hue undefined
    x[1, :, :, :3] = torch.tensor([1.0, 0.5, 0.5]).view(3, 1, 1)   # max in red, g == b
    x[2, 0, :2], x[2, 1, :2] = 0.7, 0.7                      # red == green maximum
    x[3, :, -2:] = 0.0
    x[4, :, -2:] = 1.0
    return x.to(device)


def per_sample(fn, x, params):
    return torch.stack([fn(x[i], *(float(p[i]) for p in params)) for i in range(x.shape[0])])


@pytest.mark.parametrize("device", DEVICES)
def test_to_float_matches_to_dtype(device):
    x = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8, device=device).permute(0, 3, 1, 2)
    ours = A.to_float(x)
    assert ours.dtype == torch.float32 and ours.is_contiguous()
    assert torch.equal(ours, TF.to_dtype(x, torch.float32, scale=True))
    with pytest.raises(TypeError, match="uint8"):
        A.to_float(ours)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_blends_match_torchvision(device, name):
    x = images(device=device)
    f = torch.tensor([0.0, 0.2, 0.9, 1.0, 1.5, 1.8], device=device)
    ours = getattr(A, f"adjust_{name}")(x, f)
    ref = per_sample(getattr(TF, f"adjust_{name}"), x, [f])
    torch.testing.assert_close(ours, ref, atol=EXACT, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_hue_matches_torchvision(device):
    x = images(n=8, device=device)
    shift = torch.tensor([-0.5, -0.3, -0.1, 0.0, 0.05, 0.2, 0.37, 0.5], device=device)
    ours = A.adjust_hue(x, shift)
    torch.testing.assert_close(ours, per_sample(TF.adjust_hue, x, [shift]), atol=HUE_TOL, rtol=0)
    # channels-last input gives the same values
    torch.testing.assert_close(A.adjust_hue(x.contiguous(memory_format=torch.channels_last), shift), ours)


@pytest.mark.parametrize("device", DEVICES)
def test_grayscale_solarize_flip_match_torchvision(device):
    x = images(device=device)
    torch.testing.assert_close(A.to_grayscale(x), torch.stack([TF.rgb_to_grayscale(i, 3) for i in x]),
                               atol=EXACT, rtol=0)
    for t in (0.5, 0.3):
        torch.testing.assert_close(A.solarize(x, t), torch.stack([TF.solarize(i, t) for i in x]), atol=EXACT, rtol=0)
    assert torch.equal(A.hflip(x), TF.horizontal_flip(x))


@pytest.mark.parametrize("device", DEVICES)
def test_blur_matches_torchvision(device):
    x = images(n=5, h=19, w=26, device=device)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0], device=device)
    for k in (3, 7, 11):
        ours = A.gaussian_blur(x, sigma, k)
        ref = torch.stack([TF.gaussian_blur(x[i], [k, k], [float(sigma[i])] * 2) for i in range(5)])
        torch.testing.assert_close(ours, ref, atol=BLUR_TOL, rtol=0)
    fixed = A.gaussian_blur(x.contiguous(memory_format=torch.channels_last), 1.3, 9)   # one sigma
    torch.testing.assert_close(fixed, TF.gaussian_blur(x, [9, 9], [1.3, 1.3]), atol=BLUR_TOL, rtol=0)
    with pytest.raises(ValueError, match="too large"):
        A.gaussian_blur(x, 1.0, 41)


def test_kernel_sizes_scale_with_the_image():
    assert A.blur_kernel_size(224) == 23 and A.blur_kernel_size(32) == 3 and A.blur_kernel_size(96) == 11
    assert A.highpass_kernel_size(5.0, 224) == 31
    assert A.highpass_kernel_size(5.0, 8) == 15               # capped: reflect padding needs pad < size
    for size in (8, 32, 224):
        assert A.blur_kernel_size(size) % 2 == 1


@pytest.mark.parametrize("device", DEVICES)
def test_highpass_and_normalize_match_torchvision(device):
    x = images(device=device)
    ours = A.highpass(x, 2.0, 13)
    torch.testing.assert_close(ours, x - TF.gaussian_blur(x, [13, 13], [2.0, 2.0]), atol=BLUR_TOL, rtol=0)
    assert ours.mean().abs() < 0.05                           # centred on 0: "no information"
    mean, std = A.IMAGENET_MEAN, A.IMAGENET_STD
    torch.testing.assert_close(A.normalize(x, mean, std), TF.normalize(x, list(mean), list(std)),
                               atol=EXACT, rtol=0)


def _torchvision_jitter(x, factors, order):
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    out = []
    for i in range(x.shape[0]):
        img = x[i]
        for op in order[i].tolist():
            img = fns[op](img, float(factors[i, op]))
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize("device", DEVICES)
def test_color_jitter_applies_each_samples_order(device):
    n = 12
    x = images(n=n, device=device, seed=1)
    g = torch.Generator(device=device).manual_seed(3)
    factors = torch.stack([A.uniform(n, 0.2, 1.8, g, device) for _ in range(3)] +
                          [A.uniform(n, -0.2, 0.2, g, device)], 1)
    factors[0] = torch.tensor([1.0, 1.0, 1.0, 0.0])                       # a sample left alone
    order = A.jitter_order(n, g, device, rotation=2)
    ref = _torchvision_jitter(x, factors, order)
    # hue samples found by nonzero(), and given as static groups (as the augmenter does, which
    # leaves samples without jitter out of them: those come back bit for bit)
    torch.testing.assert_close(A.color_jitter(x.clone(), factors, order), ref, atol=HUE_TOL, rtol=0)
    groups = [(order[1:, k] == A.HUE).nonzero().squeeze(1) + 1 for k in range(4)]
    out = A.color_jitter(x.clone(), factors, order, groups)
    torch.testing.assert_close(out, ref, atol=HUE_TOL, rtol=0)
    assert torch.equal(out[0], x[0])


def test_jitter_order_is_uniform_over_the_24_orders():
    g = torch.Generator().manual_seed(0)
    host = torch.Generator().manual_seed(1)
    counts = dict.fromkeys(itertools.permutations(range(4)), 0)
    rows = []
    for _ in range(300):
        rotation = int(torch.randint(4, (1,), generator=host))
        order = A.jitter_order(30, g, "cpu", rotation)
        rows.append(order)
        for row in order.tolist():
            counts[tuple(row)] += 1
    orders = torch.cat(rows)
    assert (orders.sort(1).values == torch.arange(4)).all()           # each row is a permutation
    total = sum(counts.values())
    expected = total / 24
    # binomial std of a count ~ sqrt(9000 / 24) ~ 19; allow 5 sigma
    assert all(abs(c - expected) < 5 * math.sqrt(expected) for c in counts.values()), counts
    # hue's slot is stratified within a call: the slots of one batch are near-equal groups
    one = A.jitter_order(30, g, "cpu", rotation=1)
    per_slot = torch.bincount((one == A.HUE).float().argmax(1), minlength=4)
    assert per_slot.max() - per_slot.min() <= 1


def test_jitter_order_puts_hue_where_hue_groups_say():
    # the augmenter's hue index comes from hue_groups: every sample's drawn order must agree with
    # it, for every count (not only multiples of 4)
    g = torch.Generator().manual_seed(0)
    for n in range(1, 41):
        for rotation in range(4):
            hue_slot = (A.jitter_order(n, g, "cpu", rotation) == A.HUE).float().argmax(1)
            groups = A.hue_groups(n, rotation)
            assert sorted(s for s, _, _ in groups) == [0, 1, 2, 3]
            assert groups[0][1] == 0 and groups[-1][2] == n                  # contiguous, all n
            assert all(a[2] == b[1] for a, b in zip(groups, groups[1:]))
            for slot, start, end in groups:
                assert (hue_slot[start:end] == slot).all(), (n, rotation, slot)


def test_subset_size_is_p_times_n_on_average():
    host = torch.Generator().manual_seed(0)
    for p, n in ((0.2, 7), (0.5, 9), (0.8, 256), (0.1, 3)):
        sizes = torch.tensor([A.subset_size(p, n, host) for _ in range(4000)], dtype=torch.float)
        assert set(sizes.unique().tolist()) <= {math.floor(p * n), math.ceil(p * n)}
        assert abs(sizes.mean().item() - p * n) < 0.03 * max(1.0, p * n)
    assert A.subset_size(0.0, 10, host) == 0 and A.subset_size(1.0, 10, host) == 10


@pytest.mark.parametrize("device", DEVICES)
def test_random_subset_and_apply_to(device):
    g = torch.Generator(device=device).manual_seed(0)
    idx = A.random_subset(10, 4, g, device)
    assert idx.shape == (4,) and (idx.diff() > 0).all() and idx.max() < 10
    assert A.random_subset(10, 0, g, device) is None
    assert torch.equal(A.random_subset(10, 10, g, device), torch.arange(10, device=device))
    # every sample equally likely to be picked
    hits = torch.zeros(10, device=device)
    for _ in range(2000):
        hits[A.random_subset(10, 3, g, device)] += 1
    assert ((hits / 2000 - 0.3).abs() < 0.05).all()
    x = images(n=10, device=device)
    scale = torch.arange(10, dtype=torch.float32, device=device)
    out = A.apply_to(x.clone(), idx, lambda im, s: im * s.view(-1, 1, 1, 1), scale)
    mask = A.subset_mask(10, idx, device)
    assert torch.equal(out[~mask], x[~mask])
    torch.testing.assert_close(out[mask], x[mask] * scale[mask].view(-1, 1, 1, 1))
