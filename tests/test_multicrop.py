"""Multi-crop through the Siamese methods: 2 global + 6 local views of two sizes, the network run once
per size group, each global view compared with every other view. The loss of SimCLR and BYOL against
a computation written per pair (numpy NT-Xent, 2 - 2 cos), on the same network outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import masksiam  # noqa: F401
from losses import METHODS
from models.resnet import build_backbone
from pipelines.augment.engine import build_augmenter

from test_losses import np_cos, np_nt_xent

SIZES = [32, 32] + [16] * 6


def _setup(method: str, recipe: str):
    torch.manual_seed(0)
    cls = METHODS[method]
    hp = {**cls.DEFAULTS, "proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32 if cls.predictor else 0}
    net = cls(build_backbone("resnet10", small_stem=True, width=8), hp).double()
    aug = build_augmenter(recipe, SIZES, seed=0)
    g = torch.Generator().manual_seed(1)
    views = [torch.randint(0, 256, (6, 3, s, s), generator=g, dtype=torch.uint8)
             .contiguous(memory_format=torch.channels_last) for s in SIZES]
    out = aug(views)
    out.views = [v.double() for v in out.views]
    return net, out


def _by_hand(net, out, branch):
    """Each size group through `branch` as one batch (as BatchNorm must see it) -> z, p per view."""
    z, p = {}, {}
    for group in out.groups:
        _, zg, pg = branch(torch.cat([out.views[v] for v in group]))
        for k, v in enumerate(group):
            z[v] = zg.chunk(len(group))[k].detach().numpy()
            p[v] = pg.chunk(len(group))[k].detach().numpy() if pg is not None else None
    return z, p


def test_multicrop_pairs_and_groups():
    net, out = _setup("simclr", "simclr_multicrop")
    assert [tuple(v.shape[-2:]) for v in out.views] == [(32, 32)] * 2 + [(16, 16)] * 6
    assert out.groups == [[0, 1], [2, 3, 4, 5, 6, 7]]
    assert sorted(out.pairs) == sorted([(0, 1)] + [(g, j) for g in (0, 1) for j in range(2, 8)])


def test_simclr_multicrop_loss_is_the_mean_over_pairs():
    net, out = _setup("simclr", "simclr_multicrop")
    loss, _ = net(out)
    z, _ = _by_hand(net, out, net.online)
    t = net.hp["temperature"]
    ref = np.mean([np_nt_xent(z[i], z[j], t) for i, j in out.pairs])
    assert loss.item() == pytest.approx(ref, rel=1e-10)


def test_byol_multicrop_loss_is_the_mean_over_pairs_of_both_directions():
    net, out = _setup("byol", "byol_multicrop")
    loss, _ = net(out)
    _, p = _by_hand(net, out, net.online)
    with torch.no_grad():
        zt, _ = _by_hand(net, out, net.target)
    per_pair = [(2 - 2 * np_cos(p[i], zt[j])).mean() + (2 - 2 * np_cos(p[j], zt[i])).mean() for i, j in out.pairs]
    assert loss.item() == pytest.approx(np.mean(per_pair), rel=1e-10)


def test_one_forward_per_size_group():
    net, out = _setup("simclr", "simclr_multicrop")
    calls = []
    handle = net.online.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    net(out)
    handle.remove()
    assert calls == [(12, 3, 32, 32), (36, 3, 16, 16)]
