"""The fused augment branch (pipelines/augment/fused.py, `build_augmenter(..., compile=True)`)
against the eager stage: the same draws give the same views to float rounding. The traced function
itself (eager) is checked for every recipe; torch.compile'd (inductor, C++ on this CPU) for mscn and
byol at a small size.

Tolerance: 2e-5 in normalised units; the filters sum their taps in another order than conv2d
(~1e-7 on [0, 1]), divided by std ~0.225 and carried through the later ops."""
from __future__ import annotations

import pytest
import torch

from pipelines.augment.engine import build_augmenter
from pipelines.augment.fused import bytes_per_view
from test_augment_engine import NoHostSync, one_thread
from test_recipes import photo_views

TOL = 2e-5
RECIPES = ["simclr", "byol", "mocov2", "mscn", "mscn_byol", "mixmask", "unmix", "simmim", "plain"]


def _pair(name: str, size: int, n: int, compiled: bool, chunk: int = 3):
    """The eager and the fused augmenter, same seed, and one batch for both."""
    with one_thread():
        eager = build_augmenter(name, size, seed=3, chunk=chunk)
        fused = build_augmenter(name, size, seed=3, chunk=chunk, compile=True)
    if not compiled:
        fused._fused_fn = [f.forward for f in fused.fused]           # the traced function, run eagerly
    return eager, fused, photo_views(n, size, eager.sources)


def _assert_same(a, b):
    assert len(a.views) == len(b.views)
    for x, y in zip(a.views, b.views):
        assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, x, atol=TOL, rtol=0)
    if a.mixed is not None:
        torch.testing.assert_close(b.mixed, a.mixed, atol=TOL, rtol=0)
        torch.testing.assert_close(b.mix_lam, a.mix_lam)


@pytest.mark.parametrize("name", RECIPES)
def test_fused_function_equals_the_eager_stage(name):
    eager, fused, views = _pair(name, 32, 7, compiled=False)
    for _ in range(2):                                                # and the generators stay in step
        _assert_same(eager(views), fused(views))


def test_fused_whole_batch_chunk_and_no_host_sync():
    # one chunk (a compiled stage's GPU default): the branch results become the outputs
    eager, fused, views = _pair("mscn_byol", 32, 7, compiled=False, chunk=7)
    plan = fused._plan(7)
    with NoHostSync():
        out = fused._run(views, plan)
    _assert_same(eager(views), out)


def test_fused_multicrop_equals_the_eager_stage():
    sizes = [32, 32, 16, 16]
    with one_thread():
        eager = build_augmenter("mscn_multicrop", sizes + [16] * 4, seed=0, chunk=4)
        fused = build_augmenter("mscn_multicrop", sizes + [16] * 4, seed=0, chunk=4, compile=True)
    fused._fused_fn = [f.forward for f in fused.fused]
    views = [photo_views(5, s, 1, seed=i)[0] for i, s in enumerate(sizes + [16] * 4)]
    _assert_same(eager(views), fused(views))


def _inductor_works() -> bool:
    """Whether torch.compile's C++ backend builds on this machine (called when the test runs)."""
    try:
        return torch.compile(lambda t: t * 2 + 1, fullgraph=True)(torch.ones(3)).sum().item() == 9.0
    except Exception:                                                 # no C++ compiler: skip, say why
        return False


@pytest.mark.slow                    # inductor's C++ compile: ~40 s on 2 cores, ~10 s from its disk cache
def test_compiled_branch_equals_the_eager_stage():
    if not _inductor_works():
        pytest.skip("inductor cannot compile on this machine (no C++ toolchain)")
    # mscn_byol has every op: colour jitter, grayscale, blur, solarize, high-pass, masks, noise
    eager, fused, views = _pair("mscn_byol", 16, 6, compiled=True)
    _assert_same(eager(views), fused(views))


def test_bytes_per_view_of_the_eager_stage():
    # normalise only, float32 out, per pixel: uint8 -> float32 (reads 3 bytes, writes 12), the
    # normalising multiply-add (12 + 12) and the copy into the output (12 + 12): 63 bytes, plus the
    # 2 x 3 constants the multiply-add reads per chunk
    aug = build_augmenter("plain", 32, seed=0)
    views = photo_views(4, 32, 2)
    per_view = bytes_per_view(aug, views)
    assert abs(per_view - 63 * 32 * 32) <= 24
    assert bytes_per_view(build_augmenter("mscn", 32, seed=0), views) > 10 * per_view
