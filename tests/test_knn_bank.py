"""eval.knn.extract_features (the kNN queries, eval.linear --fast's cached features): the split's
features in index order without its padding copies, compacted in place when the loader gave them
in index order (a sequential eval loader), so the peak stays near 1x the features.
The bank's own peak (knn_accuracy) is tests/test_knn.py's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import eval.knn as knn_mod
from conftest import resident_peak_ratio
from test_knn import _LenLoader, _transform

CPU = torch.device("cpu")


def _loader(order: torch.Tensor, n: int, batch: int = 5, seed: int = 0):
    """Images n in 1x1 pixels, read in `order` (dataset indices, copies included)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, 1, 1), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 4, (n,), generator=g)
    return _LenLoader(pixels[order], labels[order], order, batch), pixels, labels


@pytest.mark.parametrize("order", ["sequential", "shuffled"])
def test_features_in_index_order_without_padding_copies(order, monkeypatch):
    """23 images + the wrap-around padding of a last batch (indices 0, 1 again): the reference is a
    sort and dedupe; a sequential read is compacted in the buffer embed filled (no copy)."""
    n = 23
    read = torch.cat([torch.arange(n), torch.arange(2)])
    if order == "shuffled":
        read = read[torch.randperm(len(read), generator=torch.Generator().manual_seed(3))]
    loader, pixels, labels = _loader(read, n)
    buffers = []
    embed = knn_mod.embed
    monkeypatch.setattr(knn_mod, "embed", lambda *a, **k: buffers.append(embed(*a, **k)) or buffers[-1])
    feats, labs = knn_mod.extract_features(torch.nn.Flatten(), loader, _transform, CPU)
    ref = F.normalize(_transform(pixels).flatten(1), dim=1)
    assert torch.equal(feats, ref) and torch.equal(labs, labels)
    in_place = feats.data_ptr() == buffers[0][0].data_ptr()
    assert in_place == (order == "sequential")


_PEAK_SCRIPT = r"""
import re, sys, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from conftest import resident_peak_ratio
from test_knn import _LenLoader, _transform
from eval.knn import extract_features
torch.set_num_threads(1)
N, PAD, D, B = 1530, 6, 16384, 128                      # 1536 rows read (6 padding copies), float32
pixels = torch.randint(0, 256, (N, 3, 1, 1), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
labels = torch.arange(N) % 2
idx = torch.cat([torch.arange(N), torch.arange(PAD)])  # a sequential eval loader's padded last batch
loader = _LenLoader(pixels[idx], labels[idx], idx, B)
backbone = torch.nn.Linear(3, D)
backbone.forward = lambda x, f=backbone.forward: f(x.flatten(1))

def rss(key):
    return int(re.search(key + r":\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024

extract_features(backbone, _LenLoader(pixels[:8], labels[:8], torch.arange(8), B), _transform, torch.device("cpu"))
open("/proc/self/clear_refs", "w").write("5")           # reset the peak (VmHWM) to the current RSS
base = rss("VmRSS")
feats, _ = extract_features(backbone, loader, _transform, torch.device("cpu"))
assert feats.shape == (N, D)
print((rss("VmHWM") - base) / (N * D * 4))
"""


def test_features_peak_is_at_most_one_and_a_half_times_the_features():
    """96 MB of float32 features (1,536 rows read, 6 padding copies) from a sequential loader: the
    resident peak over extract_features <= 1.5x their bytes (fresh interpreter, fixed mmap threshold,
    as tests/test_knn.py measures the bank); sorting by gather + boolean copies peaked at ~2x."""
    ratio = resident_peak_ratio(_PEAK_SCRIPT)
    assert 0.9 < ratio <= 1.5, ratio
