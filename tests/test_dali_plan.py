"""The DALI loader's host side without DALI: the vectorised crop draws (pipelines/loaders/crop_draws.py),
nvJPEG's per-pipeline padding and the release of DALI's buffers after the copies out of them."""
from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import torch

from pipelines.loaders.crop_draws import batch_boxes, seed_states
from pipelines.loaders.spec import CropGroup, LoaderSpec

MULTI = (CropGroup(2, 224, (0.14, 1.0)), CropGroup(6, 96, (0.05, 0.14)))


def spec_of(crops, seed=0, ratio=(3 / 4, 4 / 3), flip_prob=0.5) -> LoaderSpec:
    return LoaderSpec(train=True, crops=crops, ratio=ratio, flip_prob=flip_prob, batch_size=8, rank=0,
                      world_size=1, seed=seed, drop_last=True, max_images=0, workers=1, prefetch=1,
                      device=torch.device("cpu"))


def per_sample(spec, epoch, indices, heights, widths) -> np.ndarray:
    return np.stack([spec.boxes(epoch, int(i), int(h), int(w)) for i, h, w in zip(indices, heights, widths)])


def test_seed_states_are_numpys_seed_sequence():
    words = [[0, 0, 5, 0xC0], [3, 1, 2**32 - 1, 0xC0], [7, 0, 1, 0, 0xC0], [1, 2, 3, 4, 5, 6, 0xC0]]
    for w in words:
        got = seed_states(np.array([w], np.uint32))[0]
        np.testing.assert_array_equal(got, np.random.SeedSequence(w).generate_state(4, np.uint64))


@pytest.mark.parametrize("crops,seed,ratio,flip_prob", [
    ((CropGroup(2, 224, (0.08, 1.0)),), 0, (3 / 4, 4 / 3), 0.5),     # the default recipe
    (MULTI, 12345, (3 / 4, 4 / 3), 0.5),                              # multi-crop: 8 views, two scale ranges
    ((CropGroup(3, 32, (0.5, 1.0)),), 2**40 + 7, (0.2, 5.0), 1.0),    # a two-word seed, wide ratios, always flip
    ((CropGroup(1, 32, (0.9, 1.0)),), 1, (1.0, 1.0), 0.0),           # square boxes only: many misses
])
def test_batch_boxes_equal_spec_boxes(crops, seed, ratio, flip_prob):
    """Bit for bit spec.boxes on ~1,000 samples per case: random sizes, 1-px sides (no draw of
    top or left: numpy skips a range of one), extreme aspect ratios (ten misses, the central crop),
    epochs of one and two words; the buffered 32-bit halves carry across views."""
    spec = spec_of(crops, seed, ratio, flip_prob)
    rng = np.random.default_rng(seed % 1000)
    n = 800
    indices = rng.choice(10**7, n, replace=False)
    heights, widths = rng.integers(1, 700, n), rng.integers(1, 700, n)
    heights[:40], widths[40:80] = 1, 1
    heights[80:120], widths[80:120] = 5000, 3
    heights[120:160] = widths[120:160]                             # square
    for epoch in (7, 2**33):
        got = batch_boxes(spec, epoch, indices, heights, widths)
        assert got.shape == (n, spec.views, 5) and got.dtype == np.int64
        np.testing.assert_array_equal(got, per_sample(spec, epoch, indices, heights, widths))


def test_batch_boxes_lemire_rejection_and_fallbacks():
    """Ranges near 2^31 make numpy's Lemire step reject often (redrawn through spec.boxes); sizes at
    or past 2^32, negative seeds and an empty batch take the scalar path: all equal spec.boxes."""
    spec = spec_of((CropGroup(2, 32, (0.01, 0.3)),), seed=3)
    n = 300
    indices = np.arange(n) * 7919
    heights = np.full(n, 3_000_000_000)
    widths = np.full(n, 2_900_000_000)
    np.testing.assert_array_equal(batch_boxes(spec, 2, indices, heights, widths),
                                  per_sample(spec, 2, indices, heights, widths))
    heights[:3] = 1 << 32                                          # numpy's 64-bit integer path
    np.testing.assert_array_equal(batch_boxes(spec, 2, indices[:6], heights[:6], widths[:6]),
                                  per_sample(spec, 2, indices[:6], heights[:6], widths[:6]))
    assert batch_boxes(spec, 0, [], [], []).shape == (0, 2, 5)


def test_batch_boxes_follow_the_spec_order():
    """The same sample gets the same boxes whatever batch, position or batch size it is drawn in."""
    spec = spec_of(MULTI, seed=5)
    indices, heights, widths = np.arange(64), np.full(64, 300), np.full(64, 451)
    whole = batch_boxes(spec, 4, indices, heights, widths)
    order = np.random.default_rng(0).permutation(64)
    np.testing.assert_array_equal(batch_boxes(spec, 4, indices[order], heights[order], widths[order]), whole[order])
    np.testing.assert_array_equal(batch_boxes(spec, 4, indices[10:11], heights[:1], widths[:1]), whole[10:11])
    assert not np.array_equal(batch_boxes(spec, 5, indices, heights, widths), whole)


# ---- nvJPEG's padding per pipeline --------------------------------------------------------------------

def test_decoder_padding_per_pipeline():
    from pipelines.loaders.dali_loader import PADDING_BUDGET, decoder_padding, padding_bytes
    mib = 1 << 20
    # one thread: capped at ImageNet's largest image (what the fixed per-thread constants were)
    assert decoder_padding(1, True) == dict(device_memory_padding=211_025_920, host_memory_padding=140_544_512)
    # 16 threads (a DGX rank): the training pipeline's budget split over its threads
    pad = decoder_padding(16, True)
    assert pad == dict(device_memory_padding=64 * mib, host_memory_padding=32 * mib)
    assert padding_bytes(16, True) == dict(device=1 << 30, pinned=1 << 30)
    assert padding_bytes(16, True)["device"] == PADDING_BUDGET["device"]
    # the fixed constants cost 16 x 201 MiB of GPU and 32 x 134 MiB pinned per pipeline
    assert 16 * 211_025_920 > 3 * padding_bytes(16, True)["device"]
    assert 32 * 140_544_512 > 4 * padding_bytes(16, True)["pinned"]
    # many threads: never below DALI's defaults per thread
    assert decoder_padding(128, True) == dict(device_memory_padding=16 * mib, host_memory_padding=8 * mib)
    # evaluation pipelines (kNN's bank and queries): DALI's defaults
    assert decoder_padding(16, False) == dict(device_memory_padding=16 * mib, host_memory_padding=8 * mib)
    assert padding_bytes(16, False) == dict(device=256 * mib, pinned=256 * mib)
    for threads in (1, 2, 3, 5, 8, 16, 32, 64):
        for train in (True, False):
            b = padding_bytes(threads, train)
            assert b["device"] <= max(PADDING_BUDGET["device"], threads * 16 * mib)
            assert b["pinned"] <= max(PADDING_BUDGET["host"], threads * 16 * mib)


# ---- DALI's buffers stay referenced until the copies out of them have run -------------------------------

class FakeEvent:
    def __init__(self, done: bool):
        self.done, self.waited = done, False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


def test_held_outputs_released_in_order_once_their_copies_ran():
    from pipelines.loaders.dali_loader import DaliLoader
    ld = DaliLoader.__new__(DaliLoader)  # no pipeline: only the bookkeeping
    events = [FakeEvent(True), FakeEvent(False), FakeEvent(True)]
    ld._held = deque((e, f"outputs {k}") for k, e in enumerate(events))
    ld._release_held()
    assert [o for _, o in ld._held] == ["outputs 1", "outputs 2"]   # 2 has run, but 1 not: kept in order
    events[1].done = True
    ld._release_held()
    assert not ld._held
    ld._held = deque([(FakeEvent(False), "a"), (FakeEvent(False), "b")])
    waiting = [e for e, _ in ld._held]
    ld._release_held(wait=True)                                      # the end of an epoch
    assert not ld._held and all(e.waited for e in waiting)
