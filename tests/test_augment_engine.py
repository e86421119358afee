"""The Augmenter's engine (pipelines/augment/engine.py): chunking that changes nothing but the
documented noise, no host-device sync after the host plan, multi-size (multi-crop) views."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.augment import engine as E
from pipelines.augment.engine import build_augmenter
from test_recipes import photo_views

aten = torch.ops.aten


@contextlib.contextmanager
def one_thread():
    """An augmenter built under it runs its chunks inline and in order, as on a GPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class NoHostSync(TorchDispatchMode):
    """Fails on every op that reads a device value back to the host on CUDA: .item() / int() /
    bool() of a tensor, nonzero, boolean-mask indexing, bincount, unique, torch.equal."""
    SYNCING = {aten._local_scalar_dense, aten.nonzero, aten.masked_select, aten.bincount, aten._unique2,
               aten.unique_dim, aten.unique_consecutive, aten.masked_scatter, aten.equal, aten.is_nonzero}
    INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func.overloadpacket
        if packet in self.SYNCING:
            raise AssertionError(f"host sync in the augment path: {func}")
        if packet in self.INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
            raise AssertionError(f"boolean-mask indexing in the augment path: {func}")
        if packet is aten.repeat_interleave and isinstance(args[0], torch.Tensor) and "output_size" not in (kwargs or {}):
            raise AssertionError("repeat_interleave without output_size reads the size back")
        return func(*args, **(kwargs or {}))


def test_the_sync_detector_detects():
    x = torch.arange(6.0)
    for bad in (lambda: x[x > 2], lambda: x.sum().item(), lambda: torch.bincount(x.long()), lambda: x.nonzero()):
        with pytest.raises(AssertionError, match="host sync|boolean"), NoHostSync():
            bad()


@pytest.mark.parametrize("name", ["mscn", "mscn_byol", "byol", "mixmask", "unmix", "simmim"])
def test_no_host_sync_after_the_host_plan(name):
    # the GPU code path on the CPU: chunks inline, several per batch; everything after the host's
    # plan (uploads, device draws, pixels, mixing, the returned parameters) reads nothing back
    with one_thread():
        aug = build_augmenter(name, 32, seed=0, chunk=3)
    views = photo_views(7, 32, aug.sources)
    plan = aug._plan(7)
    with NoHostSync():
        out = aug._run(views, plan, return_params=True)
    assert len(out.views) == len(aug.recipe.view_branches())


def test_default_chunks():
    assert E.default_chunk("cpu", 224) == 4 and E.default_chunk("cpu", 32) == 64
    assert E.default_chunk("cuda", 224) == 27 and E.default_chunk("cuda", 96) == 151
    assert build_augmenter("simclr", 224).chunk == 4 and build_augmenter("simclr", 224, chunk=16).chunk == 16


@pytest.mark.parametrize("name", ["simclr", "byol", "mixmask", "unmix"])
def test_chunk_size_changes_nothing_without_noise(name):
    views = photo_views(7, 32, 2)
    with one_thread():
        whole = build_augmenter(name, 32, seed=0, chunk=7)(views)
        for chunk in (1, 3, 4):
            part = build_augmenter(name, 32, seed=0, chunk=chunk)(views)
            for x, y in zip(whole.views + [whole.mixed], part.views + [part.mixed]):
                if x is not None:
                    torch.testing.assert_close(x, y, atol=1e-6, rtol=0)


def test_chunk_size_changes_only_the_noise_fill():
    views = photo_views(7, 32, 2)
    with one_thread():
        whole = build_augmenter("mscn", 32, seed=0, chunk=7)(views, return_params=True)
        part = build_augmenter("mscn", 32, seed=0, chunk=2)(views, return_params=True)
    for x, y, p, q in zip(whole.views, part.views, whole.params, part.params):
        mask = p.mask_pixels()
        assert torch.equal(mask, q.mask_pixels())
        torch.testing.assert_close(x[~mask], y[~mask], atol=1e-6, rtol=0)
        if mask.any():
            assert not torch.equal(x[mask], y[mask])                           # other noise draws
            assert abs(y[mask].std() - p.noise_std) < 0.1 * p.noise_std
