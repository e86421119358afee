"""tools/vs_lightly.py: the shared kNN scores both sides with the project's vote (checked here against a
numpy weighted kNN), the speed counts only the timed steps, and the network is the one both sides train."""
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))
import vs_lightly  # noqa: E402


def numpy_knn_top1(bank, yb, queries, yq, k, t):
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    sim = queries @ bank.T
    top = np.argsort(-sim, axis=1)[:, :k]
    votes = np.zeros((len(queries), yb.max() + 1))
    for q in range(len(queries)):
        np.add.at(votes[q], yb[top[q]], np.exp(sim[q, top[q]] / t))
    return 100.0 * (votes.argmax(1) == yq).mean()


def test_knn_equals_a_numpy_weighted_knn():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 16, generator=g)
    yb, yq = torch.randint(0, 5, (300,), generator=g), torch.randint(0, 5, (80,), generator=g)
    xb = centers[yb] + 1.5 * torch.randn(300, 16, generator=g)
    xq = centers[yq] + 1.5 * torch.randn(80, 16, generator=g)
    got = vs_lightly.knn_top1(nn.Flatten(), (xb, yb), (xq, yq), k=20, t=0.1)
    want = numpy_knn_top1(xb.double().numpy(), yb.numpy(), xq.double().numpy(), yq.numpy(), 20, 0.1)
    assert got == pytest.approx(want, abs=1e-4)      # one prediction is 1.25 points
    assert 40 < got < 100                               # neither trivial nor chance on these clusters


def test_speed_skips_the_warmup_steps():
    args = SimpleNamespace(batch=256, warmup=2)
    # two slow start-up steps, then 4 steps of 0.5 s: 256 / 0.5 images per second
    assert vs_lightly.speed([10.0, 3.0, 0.5, 0.5, 0.5, 0.5], args) == pytest.approx(512.0)


def test_the_network_is_resnet18_with_the_small_stem():
    net = vs_lightly.small_stem_resnet18(64)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity) and net.num_features == 512
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, 512)
    # torchvision's init (zero_init_residual=False): the last BN of every block starts at 1, as in lightly's loop
    assert all(float(b.bn2.weight.min()) == 1.0 for layer in (net.layer1, net.layer4) for b in layer)
