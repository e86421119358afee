"""The Augmenter's engine (pipelines/augment/engine.py): chunking that changes nothing but the
documented noise, no host-device sync after the host plan, multi-size (multi-crop) views."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from masksiam.config import load_config
from pipelines.augment import engine as E
from pipelines.augment import ops as A
from pipelines.augment.engine import build_augmenter
from pipelines.augment.recipes import RecipeError, load_recipe
from test_augment_replay import TOL, replay
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


# ---- multi-crop: views of several sizes -----------------------------------------------------------

SIZES = [32, 32, 16, 16, 16, 16, 16, 16]                  # 2 global + 6 local crops, crop order


def test_multicrop_recipes_pair_each_global_view_with_every_other():
    simclr = load_recipe("simclr_multicrop")
    assert simclr.sources == 8 and [b.local for b in simclr.branches] == [False] * 2 + [True] * 6
    assert [b.source for b in simclr.branches] == list(range(8))
    assert simclr.branches[7].color == load_recipe("simclr").branches[0].color
    assert list(simclr.pairs) == [(0, 1)] + [(0, j) for j in range(2, 8)] + [(1, j) for j in range(2, 8)]
    byol = load_recipe("byol_multicrop")
    assert [b.blur.p for b in byol.branches] == [1.0, 0.1] + [0.5] * 6                # DINO's blur
    assert [bool(b.solarize) for b in byol.branches] == [False, True] + [False] * 6
    mscn = load_recipe("mscn_multicrop")
    assert mscn.view_branches() == [0, 0, 1, 2, 3, 4, 5, 6, 7] and len(mscn.pairs) == 2 + 3 * 6
    assert (0, 1) not in mscn.pairs and (0, 2) in mscn.pairs and (2, 3) in mscn.pairs and (3, 4) not in mscn.pairs
    assert all(b.mask.p == 0.5 and b.highpass for b in mscn.branches[2:])
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "fmnist_simclr_multicrop.yaml")
    assert load_recipe(cfg.recipe).sources == cfg.views == 8


@pytest.mark.parametrize("text,match", [
    ("branches: [{repeat: 0}]", r"branches\[0\]\.repeat: expected a positive integer"),
    ("branches: [{local: true}, {local: true}]\npairs: multicrop", "multicrop needs a global view"),
    ("branches: [{local: 1}]", r"branches\[0\]\.local: expected bool"),
])
def test_bad_multicrop_recipes(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)


@pytest.mark.parametrize("name", ["simclr_multicrop", "byol_multicrop"])
def test_multicrop_views_equal_torchvision_replayed(name):
    aug = build_augmenter(name, SIZES, seed=1)
    views = [photo_views(5, s, 1, seed=i)[0] for i, s in enumerate(SIZES)]
    out = aug(views, return_params=True)
    assert [v.shape[-1] for v in out.views] == SIZES and out.groups == [[0, 1], [2, 3, 4, 5, 6, 7]]
    assert out.pairs == list(aug.recipe.pairs)
    for v, p in zip(out.views, out.params):
        assert p.size == v.shape[-1] and v.is_contiguous(memory_format=torch.channels_last)
        assert p.blur_kernel == A.blur_kernel_size(p.size)                            # the view's own side
        if p.blur_sigma is not None:                                                  # the globals' pixels
            assert p.blur_sigma.min() >= 0.1 * 32 / 224 - 1e-6 and p.blur_sigma.max() <= 2.0 * 32 / 224 + 1e-6
        torch.testing.assert_close(v, replay(views, p), atol=TOL, rtol=0)


def test_multicrop_mscn_masks_and_mixing_at_each_size():
    aug = build_augmenter("mscn_multicrop", SIZES, seed=0, dtype=torch.bfloat16)
    views = [photo_views(6, s, 1, seed=i)[0] for i, s in enumerate(SIZES)]
    out = aug(views, return_params=True)
    assert [v.shape[-1] for v in out.views] == [32, 32, 32] + [16] * 6
    assert out.groups == [[0, 1, 2], [3, 4, 5, 6, 7, 8]]
    for v, p in zip(out.views, out.params):
        mask = p.mask_pixels()
        assert mask.shape == (6, 3, p.size, p.size) and int(p.masked.sum()) == (6 if p.branch == 0 else 3)
        torch.testing.assert_close(v.float()[~mask], replay(views, p)[~mask], atol=0.02, rtol=0.01)   # bf16
    mixed = build_augmenter("simclr_multicrop", SIZES, seed=0, mix="mixmask")(views)
    assert mixed.mixed.shape == (6, 3, 32, 32) and mixed.mix_source == 0


def test_multicrop_sizes_are_checked():
    aug = build_augmenter("simclr_multicrop", SIZES)
    views = [photo_views(3, 32, 1)[0] for _ in SIZES]
    with pytest.raises(ValueError, match=r"view 2 is 32x32, the augmenter was built for size 16"):
        aug(views)
    with pytest.raises(RecipeError, match="takes 8 loader views, got sizes for 2"):
        build_augmenter("simclr_multicrop", [32, 16])


# ---- augmenting ahead (batch k + 1 augmented while k trains: pipelines/augment/ahead.py) ----------

class _Batch:
    def __init__(self, views):
        self.views = views


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_augment_ahead_gives_the_same_outputs_and_the_state_to_resume_from(device):
    from pipelines.augment.ahead import AugmentAhead
    batches = [_Batch(photo_views(4, 32, 2, seed=s, device=device)) for s in range(4)]
    direct = build_augmenter("mscn", 32, device=device, seed=2)
    expect = [direct(b.views) for b in batches]
    ahead = AugmentAhead(build_augmenter("mscn", 32, device=device, seed=2))
    states = []
    for k, (batch, out) in enumerate(ahead.epoch(batches)):
        assert batch is batches[k]
        for x, y in zip(expect[k].views, out.views):
            assert torch.equal(x, y)
        states.append(ahead.state_dict())
    # resuming from the state saved after batch 1 reproduces batch 2
    resumed = build_augmenter("mscn", 32, device=device, seed=9)
    resumed.load_state_dict(states[1])
    for x, y in zip(expect[2].views, resumed(batches[2].views).views):
        assert torch.equal(x, y)


# ---- constant op shapes off the CPU (cudnn.benchmark autotunes each new conv shape) --------------

class ConvShapes(TorchDispatchMode):
    """The input shape of every convolution that runs."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (aten.convolution, aten.mkldnn_convolution, aten._convolution):
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_constant_shapes_give_one_conv_shape_per_chunk_and_the_same_views():
    # the GPU's default (constant_shapes on), on the CPU: chunks inline and in order; blur subsets of
    # a random size each call (simclr: p = 0.5), 3 chunks (4, 4, 2 rows)
    name = "simclr"
    with one_thread():
        dense = build_augmenter(name, 32, seed=0, chunk=4, constant_shapes=True)
        subset = build_augmenter(name, 32, seed=0, chunk=4)
    assert not subset.constant_shapes                          # the CPU's default: subsets
    per_call = {True: [], False: []}
    for call in range(4):
        views = photo_views(10, 32, 2, seed=call)
        for aug, key in ((dense, True), (subset, False)):
            with ConvShapes() as rec:
                out = aug(views)
            per_call[key].append(tuple(rec.shapes))
            if key:
                expect = out
        for x, y in zip(expect.views, out.views):            # the same draws, the same views
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    # whole chunks: the conv shapes come from the chunk sizes (4 and 2 rows x 3 channels) only
    shapes = {s for call in per_call[True] for s in call}
    assert {s[1] for s in shapes} <= {4 * 3, 2 * 3} and len(shapes) <= 4
    assert len(set(map(tuple, per_call[False]))) > 1         # subsets: shapes that change call to call


def test_constant_shapes_read_nothing_back():
    with one_thread():
        aug = build_augmenter("byol", 32, seed=0, chunk=3, constant_shapes=True)
    views = photo_views(7, 32, 2)
    plan = aug._plan(7)
    with NoHostSync():
        aug._run(views, plan)
