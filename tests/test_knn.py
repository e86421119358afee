"""Weighted kNN: a hand-computed vote, a separable toy set, and feature extraction's de-duplication."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import masksiam  # noqa: F401
from eval.knn import extract_features, knn_accuracy, knn_predict
from pipelines.loaders.common import Batch


def test_weighted_vote_by_hand():
    # query at angle 0; bank at angles 10 deg (class 0), 20 deg and 25 deg (class 1), 170 deg (class 2)
    angles = torch.tensor([10.0, 20.0, 25.0, 170.0]) * math.pi / 180
    bank = torch.stack([angles.cos(), angles.sin()], 1)
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[1.0, 0.0]])
    # k = 3: class 0 weight exp(cos10/t), class 1 exp(cos20/t) + exp(cos25/t)
    for t, expected in ((0.1, 1), (0.02, 0)):     # two near neighbours outvote one nearer only at t=0.1
        w0 = math.exp(math.cos(math.radians(10)) / t)
        w1 = math.exp(math.cos(math.radians(20)) / t) + math.exp(math.cos(math.radians(25)) / t)
        assert (w1 > w0) == (expected == 1)                   # the case is what it says
        assert knn_predict(bank, labels, q, num_classes=3, k=3, t=t).tolist() == [expected]
    assert knn_predict(bank, labels, q, num_classes=3, k=1).tolist() == [0]     # nearest neighbour
    assert knn_predict(bank, labels, q, num_classes=3, k=50).shape == (1,)      # k above the bank size


def test_separable_clusters_are_classified_perfectly_and_shuffled_labels_are_not():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    labels = torch.arange(5).repeat_interleave(40)
    feats = F.normalize(centres[labels] + 0.05 * torch.randn(200, 16, generator=g), dim=1)
    bank, queries = feats[::2], feats[1::2]
    pred = knn_predict(bank, labels[::2], queries, num_classes=5, k=10, t=0.1, chunk=7)   # several chunks
    assert torch.equal(pred, labels[1::2])
    shuffled = labels[::2][torch.randperm(100, generator=g)]
    assert (knn_predict(bank, shuffled, queries, 5, k=10) == labels[1::2]).float().mean() < 0.5


class _Loader:
    """Batches of 1x1 'images' whose pixels are the features; the last index repeats (a padded shard)."""

    classes = ["a", "b"]

    def __init__(self, pixels: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, batch: int):
        self.items = [(pixels[i:i + batch], labels[i:i + batch], indices[i:i + batch])
                      for i in range(0, len(labels), batch)]

    def __iter__(self):
        for x, y, idx in self.items:
            yield Batch([x], y, idx)


def test_extract_features_orders_dedupes_and_knn_accuracy_end_to_end():
    # class 0 red-ish, class 1 blue-ish pixels; delivered out of order with index 3 twice (padding)
    pixels = torch.tensor([[200, 10, 10], [10, 10, 200], [180, 30, 5], [5, 20, 220], [5, 20, 220],
                           [220, 0, 40], [0, 40, 190]], dtype=torch.uint8).view(-1, 3, 1, 1)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 1])
    indices = torch.tensor([4, 1, 0, 3, 3, 2, 5])
    backbone = torch.nn.Flatten()
    transform = lambda x: x.float() / 255 - 0.4                                   # noqa: E731
    loader = _Loader(pixels, labels, indices, batch=3)
    feats, labs = extract_features(backbone, loader, transform, torch.device("cpu"))
    assert feats.shape == (6, 3) and torch.allclose(feats.norm(dim=1), torch.ones(6))
    assert labs.tolist() == [0, 1, 0, 1, 0, 1]                                    # by index 0..5
    acc = knn_accuracy(backbone, loader, loader, transform, torch.device("cpu"), num_classes=2, k=3)
    assert acc == 1.0
