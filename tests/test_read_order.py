"""Read order (pipelines/loaders/spec.py, common.shard_order_indices): `sample` and `shard`, how
`auto` decides, the loaders that read in it, exact resume, and the webdataset .idx parser.

The shard order is checked against independent references: a loop that runs the shuffle buffer
step by step, counts per rank from shard_indices, and shard membership from the bounds.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import convert
from conftest import have_loader_library, make_image_folder
from masksiam.checkpoint import CheckpointError, check_resumable
from masksiam.config import Config, ConfigError, apply, load_config, resume_changes, to_dict
from masksiam.run_checkpoint import order_before_the_record, resume_record
from masksiam.dist import DistInfo
from pipelines.loaders import build_loader
from pipelines.loaders.common import (DataError, buffer_shuffle, chunk_bounds, class_mixing, num_batches,
                                      run_bounds, shard_indices, shard_order_indices)
from pipelines.loaders.samples import _read_idx, open_split
from pipelines.loaders.spec import ReadOrder, loader_spec

HAVE_DALI = have_loader_library("nvidia.dali")
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="nvidia-dali is not installed")
CPU = torch.device("cpu")


def uneven_bounds(shards: int = 23, seed: int = 1) -> np.ndarray:
    """(S + 1,) shard starts of shards of 1 to 12 samples (a max_images subset leaves such)."""
    sizes = np.random.default_rng(seed).integers(1, 13, shards)
    return np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)


def shard_of(bounds: np.ndarray) -> np.ndarray:
    return np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))


# ---- the shuffle buffer ----------------------------------------------------------------------------

def buffer_loop(stream, k, rng):
    """The shuffle buffer step by step (webdataset's .shuffle): the reference for buffer_shuffle."""
    stream = list(stream)
    k = min(k, len(stream))
    if k <= 1:
        return np.array(stream, np.int64)
    slots, drain = rng.integers(0, k, len(stream) - k), rng.permutation(k)
    buf, out = stream[:k], []
    for step, slot in enumerate(slots):
        out.append(buf[slot])
        buf[slot] = stream[k + step]
    return np.array(out + [buf[j] for j in drain], np.int64)


@pytest.mark.parametrize("m", [0, 1, 2, 7, 64, 1000])
@pytest.mark.parametrize("k", [1, 2, 5, 64, 5000])
def test_buffer_shuffle_equals_the_step_by_step_buffer(m, k):
    stream = np.arange(m, dtype=np.int64) * 7 + 3
    got = buffer_shuffle(stream, k, np.random.default_rng([m, k]))
    np.testing.assert_array_equal(got, buffer_loop(stream, k, np.random.default_rng([m, k])))
    assert sorted(got.tolist()) == stream.tolist()


def test_buffer_randomness_an_item_moves_about_the_buffer_size():
    """Randomness of the buffer: a sample leaves a geometric number of steps after it entered
    (p = 1/k), so its displacement from its stream position has mean ~0 and standard deviation ~k;
    the sample order's is ~m / sqrt(6) (a uniform permutation)."""
    m, k = 200_000, 1000
    out = buffer_shuffle(np.arange(m), k, np.random.default_rng(0))
    moved = (np.arange(m) - np.argsort(out))[: m - k]             # position out - position in, no drain
    assert abs(moved.mean()) < 0.02 * k and abs(moved.std() / k - 1) < 0.05
    perm = np.random.default_rng(0).permutation(m)
    assert abs((np.arange(m) - np.argsort(perm)).std() / (m / math.sqrt(6)) - 1) < 0.02


# ---- the shard order -------------------------------------------------------------------------------

@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("drop_last", [True, False])
def test_shard_order_counts_cover_and_whole_shards(world, drop_last):
    """Per rank as many samples as shard_indices gives; disjoint across ranks (drop_last) or covering
    with only the wrap-around padding repeated; whole shards per rank but where a rank's block ends."""
    bounds, batch = uneven_bounds(), 4
    n, owner = int(bounds[-1]), shard_of(uneven_bounds())
    parts = [shard_order_indices(bounds, r, world, 7, 2, batch, buffer=5, drop_last=drop_last) for r in range(world)]
    for r, part in enumerate(parts):
        assert len(part) == len(shard_indices(n, r, world, 7, 2, batch, drop_last=drop_last))
        assert math.ceil(len(part) / batch) == num_batches(n, world, batch, drop_last)
    union = np.concatenate(parts)
    if drop_last:
        assert len(set(union.tolist())) == len(union) == n // (batch * world) * batch * world
    else:
        pad = math.ceil(n / world) * world - n
        assert set(union.tolist()) == set(range(n)) and len(union) == n + pad
    sizes = np.diff(bounds)
    for part in parts:
        counts = np.bincount(owner[part], minlength=len(sizes))
        partial = np.flatnonzero((counts > 0) & (counts < sizes))
        assert len(partial) <= 2 + (not drop_last)               # the block's two ends (+ the padding)
    if drop_last:                                                 # a shard split between ranks: at most world - 1
        split = sum(len({r for r, p in enumerate(parts) if s in set(owner[p].tolist())}) > 1
                    for s in range(len(sizes)))
        assert split <= world - 1


def test_shard_order_is_a_pure_function_of_seed_epoch_rank_and_reshuffles():
    bounds = uneven_bounds(40)
    a = shard_order_indices(bounds, 1, 2, 5, 3, 4, buffer=6)
    np.testing.assert_array_equal(a, shard_order_indices(bounds.copy(), 1, 2, 5, 3, 4, buffer=6))
    assert not np.array_equal(a, shard_order_indices(bounds, 1, 2, 5, 4, 4, buffer=6))     # next epoch
    assert not np.array_equal(a, shard_order_indices(bounds, 1, 2, 6, 3, 4, buffer=6))     # other seed
    # the shards' order changes with the epoch, not only the buffer: first shard of rank 0's block
    firsts = {int(shard_of(bounds)[shard_order_indices(bounds, 0, 1, 5, e, 4, buffer=1)[0]]) for e in range(8)}
    assert len(firsts) > 3


def distinct_per_window(order: np.ndarray, owner: np.ndarray, window: int) -> np.ndarray:
    w = len(order) // window
    s = np.sort(owner[order[: w * window]].reshape(w, window), axis=1)
    return 1 + (np.diff(s, axis=1) != 0).sum(1)


def test_locality_shards_per_window_and_per_rank():
    """20,000 samples in shards of 100, buffer 1,000, windows of a 64-sample batch: the shards a
    window reads lie within the last few buffers of the rank's stream (a sample waits > 10 buffers
    with probability e^-10), against ~55 of 200 in sample order; each of 4 ranks reads its quarter of
    the shards (+ at most 2 split with a neighbour), not all of them."""
    n, size, k, window = 20_000, 100, 1000, 64
    bounds = chunk_bounds(n, size)
    owner = shard_of(bounds)
    shard = distinct_per_window(shard_order_indices(bounds, 0, 1, 0, 0, window, k), owner, window)
    sample = distinct_per_window(shard_indices(n, 0, 1, 0, 0, window), owner, window)
    assert shard.max() <= (window + 10 * k) // size + 2 and shard.mean() < sample.mean() / 2
    assert sample.mean() > 50
    # no buffer: a window reads at most the shards its 64 consecutive stream samples span
    plain = distinct_per_window(shard_order_indices(bounds, 0, 1, 0, 0, window, 1), owner, window)
    assert plain.max() <= math.ceil(window / size) + 1
    for r in range(4):
        touched = np.unique(owner[shard_order_indices(bounds, r, 4, 0, 0, window, k)])
        assert len(touched) <= 200 // 4 + 2
    assert len(np.unique(owner[shard_indices(n, 0, 4, 0, 0, window)])) == 200


def test_class_mixing_tells_shuffled_from_class_sorted_shards():
    labels = np.repeat(np.arange(10), 100)                       # 1,000 samples written class by class
    bounds = chunk_bounds(1000, 50)
    assert class_mixing(labels, bounds) == pytest.approx(0.1)
    shuffled = np.random.default_rng(0).permutation(labels)
    assert class_mixing(shuffled, bounds) > 0.9
    assert class_mixing(np.zeros(1000, np.int64), bounds) == 1.0
    np.testing.assert_array_equal(run_bounds(np.array([0, 0, 2, 2, 2, 5])), [0, 2, 5, 6])


# ---- how the spec decides --------------------------------------------------------------------------

def spec_for(world=1, **kw):
    cfg = apply(Config(), {"batch_size": 4 * world, **kw}, "test")
    return loader_spec(cfg, DistInfo(0, world, 0, CPU))


def test_auto_reads_shards_only_for_big_mixed_webdataset_splits(capsys):
    n, size = 40_000, 1000
    mixed = np.random.default_rng(0).integers(0, 10, n)
    sorted_ = np.sort(mixed)
    shards = shard_of(chunk_bounds(n, size))
    auto = spec_for()                                            # shuffle_buffer 10,000: 4 buffers = 40,000
    assert auto.read_order == "auto" and auto.shuffle_buffer == 10_000
    order = auto.read_order_of(n, shards, mixed)
    assert order.kind == "shard" and len(order.bounds) == 41 and order.buffer == 10_000
    assert auto.read_order_of(n, shards, sorted_).kind == "sample"       # class-sorted shards
    assert auto.read_order_of(n - 1, shards[:-1], mixed[:-1]).kind == "sample"   # under 4 buffers
    assert auto.read_order_of(n, None, mixed).kind == "sample"          # a folder
    assert spec_for(world=32).read_order_of(n, shards, mixed).kind == "sample"   # < 2 shards per rank
    ev = loader_spec(apply(Config(), {"batch_size": 4}, "t"), DistInfo(0, 1, 0, CPU), train=False)
    assert ev.read_order_of(n, shards, mixed).kind == "sequential"
    np.testing.assert_array_equal(ev.shard(10, 3, ev.read_order_of(10)), np.arange(10))
    assert capsys.readouterr().out == ""
    # explicit: shard for a folder (chunks of shuffle_buffer / 4 files) with a note on class order
    forced = spec_for(read_order="shard", shuffle_buffer=400)
    order = forced.read_order_of(n, None, sorted_)
    assert order.kind == "shard" and np.array_equal(order.bounds, chunk_bounds(n, 100))
    assert "class order" in capsys.readouterr().out
    np.testing.assert_array_equal(forced.shard(n, 2, order),
                                  shard_order_indices(order.bounds, 0, 1, 0, 2, 4, 400, True))
    assert spec_for(read_order="sample").read_order_of(n, shards, mixed) == ReadOrder("sample")
    np.testing.assert_array_equal(spec_for().shard(n, 1, ReadOrder("sample")), shard_indices(n, 0, 1, 0, 1, 4))


def test_ffcv_order_rule_and_bad_values():
    assert spec_for().ffcv_order("auto") == "random"
    assert spec_for(read_order="shard").ffcv_order("auto") == "quasi_random"
    assert spec_for(read_order="shard").ffcv_order("random") == "random"
    ev = loader_spec(apply(Config(), {"read_order": "shard"}, "t"), DistInfo(0, 1, 0, CPU), train=False)
    assert ev.ffcv_order("quasi_random") == "sequential"
    with pytest.raises(ConfigError, match="read_order"):
        load_config(None, ["read_order=pages"])
    with pytest.raises(ConfigError, match="shuffle_buffer=0"):
        spec_for(shuffle_buffer=0)


def test_a_checkpoint_from_before_read_order_resumes_in_the_order_it_was_trained_in():
    """The config keys it lacks are not compared; its record says it read in sample order (FFCV:
    random, unless ffcv_order was quasi_random), and the order this run's loader resolved must match:
    auto on a folder (sample) resumes it, a loader reading shards is refused naming read_order."""
    old = to_dict(Config())
    del old["read_order"], old["shuffle_buffer"]
    old["ffcv_order"] = "random"
    assert resume_changes(old, Config()) == []
    assert resume_changes(to_dict(Config()), apply(Config(), {"ffcv_order": "random"}, "t")) == []
    assert resume_changes(to_dict(Config()), apply(Config(), {"shuffle_buffer": 5}, "t")) == \
        ["shuffle_buffer=10000 (this run: 5)"]
    assert order_before_the_record(old) == "sample"
    assert order_before_the_record({**old, "loader": "ffcv", "ffcv_order": "quasi_random"}) == "shard"
    saved = {"resume_record": {"world_size": 1, "read_order": order_before_the_record(old)}}
    check_resumable(saved, "ckpt.pt", [], {"world_size": 1, "read_order": "sample"})
    with pytest.raises(CheckpointError, match="read_order='sample' \\(this run: 'shard'\\)"):
        check_resumable(saved, "ckpt.pt", [], {"world_size": 1, "read_order": "shard"})


def test_the_resume_record_holds_the_order_the_loader_resolved(image_folder):
    info = DistInfo(0, 1, 0, CPU)
    assert resume_record(loader(image_folder), info)["read_order"] == "shard"
    assert resume_record(loader(image_folder, read_order="auto"), info)["read_order"] == "sample"


# ---- loaders ---------------------------------------------------------------------------------------

def loader(data, backend="torchvision", rank=0, world=1, **kw):
    cfg = Config(**{"data": str(data), "loader": backend, "batch_size": 4 * world, "views": 2, "size": 32,
                    "workers": 0 if backend == "torchvision" else 2, "read_order": "shard",
                    "shuffle_buffer": 8, "drop_last": False, **kw})
    return build_loader(cfg, DistInfo(rank, world, 0, CPU))


def epoch(ld, e, start_batch=0):
    ld.set_epoch(e, start_batch)
    return [([v.clone() for v in b.views], b.labels.clone(), b.indices.clone()) for b in ld]


def order_of(batches) -> list[int]:
    return torch.cat([b[2] for b in batches]).tolist()


def test_torchvision_reads_folder_chunks_in_shard_order_and_resumes(image_folder):
    """Chunks of shuffle_buffer / 4 = 2 files; 24 images, 2 ranks, 3 batches of 4 per rank."""
    for rank in range(2):
        ld = loader(image_folder, rank=rank, world=2)
        assert ld.sampler.order.kind == "shard"
        full = epoch(ld, 3)
        want = shard_order_indices(chunk_bounds(24, 2), rank, 2, 0, 3, 4, 8, False)
        assert order_of(full) == want.tolist() and len(full) == len(ld) == 3
        assert want.tolist() != shard_indices(24, rank, 2, 0, 3, 4, drop_last=False).tolist()
        resumed = epoch(ld, 3, start_batch=1)
        for a, b in zip(full[1:], resumed, strict=True):
            assert torch.equal(a[2], b[2]) and all(torch.equal(u, v) for u, v in zip(a[0], b[0]))


@needs_dali
def test_dali_webdataset_shard_order_same_crops_as_torchvision(tmp_path, image_folder):
    """Shards of 5: DALI reads whole shards through the buffer, the torchvision loader the folder's
    chunks: other orders, the same crops of every image (they are drawn by index), the same images
    per epoch; DALI on the folder reads exactly the torchvision loader's order; resume is exact."""
    from test_dali import interior
    out = tmp_path / "wds"
    assert convert.main(["webdataset", "--src", str(image_folder), "--out", str(out), "--shard-size", "5"]) == 0
    wds, ref, folder = loader(out, "dali"), loader(image_folder), loader(image_folder, "dali")
    bounds = run_bounds(open_split(out / "train").shard_of)
    np.testing.assert_array_equal(bounds, [0, 5, 10, 15, 20, 24])
    assert wds.order.kind == "shard" and np.array_equal(wds.order.bounds, bounds)
    for e in (0, 2):
        got, want, same = epoch(wds, e), epoch(ref, e), epoch(folder, e)
        assert order_of(got) == shard_order_indices(bounds, 0, 1, 0, e, 4, 8, False).tolist()
        assert order_of(same) == order_of(want) and sorted(order_of(got)) == list(range(24))
        crops = {int(i): [v[k] for v in views] for views, _, idx in got for k, i in enumerate(idx)}
        for views, labels, idx in want:
            for k, i in enumerate(idx.tolist()):
                for u, v in zip(crops[i], [v[k] for v in views]):
                    diff = (u.int() - v.int()).abs()
                    assert interior(diff).max() <= 2 and diff.float().mean() < 0.5
    full, resumed = epoch(wds, 2), epoch(wds, 2, start_batch=2)
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a[2], b[2]) and all(torch.equal(u, v) for u, v in zip(a[0], b[0]))


@pytest.mark.skipif(not have_loader_library("ffcv"), reason="ffcv is not installed")
def test_ffcv_read_order_picks_its_order_and_resumes(tmp_path, image_folder):
    """read_order=shard is FFCV's page-local quasi_random, auto its random order (convert.py ffcv
    writes class by class); ffcv_order set wins; a resumed epoch yields the rest of the same one."""
    beton = tmp_path / "train.beton"
    assert convert.main(["ffcv", "--src", str(image_folder / "train"), "--out", str(beton), "--max-res", "96",
                         "--workers", "1", "--no-progress"]) == 0

    def ffcv(**kw):
        return loader(image_folder, "ffcv", ffcv_path=str(beton), drop_last=True, **kw)

    assert ffcv(read_order="auto")._order.kind == "random"
    assert ffcv(read_order="shard", ffcv_order="sequential")._order.kind == "sequential"
    ld = ffcv(read_order="shard")
    assert ld._order.kind == "quasi_random"
    full, resumed = epoch(ld, 1), epoch(ld, 1, start_batch=2)
    np.testing.assert_array_equal(ffcv(read_order="shard").epoch_rows(1), ld.epoch_rows(1))   # a fresh process
    assert len(full) == 6 and sorted(order_of(full)) == list(range(24))
    for a, b in zip(full[2:], resumed, strict=True):
        assert torch.equal(a[2], b[2]) and all(torch.equal(u, v) for u, v in zip(a[0], b[0]))


def test_a_shard_order_run_resumed_mid_epoch_equals_the_uninterrupted_run(image_folder, tmp_path, monkeypatch):
    """train.py in read order shard: stopped at step 4 (epoch 1, batch 1), resumed: every step's
    loss and the final weights equal the uninterrupted run's, bitwise on the CPU."""
    import train
    from masksiam import checkpoint as ckpt_io
    from test_train import _args, _losses
    monkeypatch.setenv("MASKSIAM_DEVICE", "cpu")
    common = ["epochs=3", "final_eval=false", "read_order=shard", "shuffle_buffer=8"]
    full = train.main(_args(image_folder, tmp_path, "full", *common))
    cut = train.main(_args(image_folder, tmp_path, "cut", *common, "max_steps=4"))
    state = ckpt_io.load(Path(cut["run_dir"]) / "checkpoint.pt")
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (4, 1, 1)
    assert state["config"]["read_order"] == "shard"
    resumed = train.main(_args(image_folder, tmp_path, "cut", *common, "resume=true"))
    assert resumed["step"] == full["step"] == 9
    assert _losses(Path(full["run_dir"])) == _losses(Path(resumed["run_dir"]))
    a = ckpt_io.load(Path(full["run_dir"]) / "checkpoint.pt")["model"]
    b = ckpt_io.load(Path(resumed["run_dir"]) / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- the .idx parser ---------------------------------------------------------------------------

def idx_by_line(path: Path):
    """The line-by-line parser that _read_idx replaced: the reference."""
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2 "):
        raise DataError(f"{path} is not a v1.2 webdataset index")
    names, offsets, sizes = [], [], []
    for line in lines[1:]:
        fields = line.split()
        image = next((fields[j:j + 4] for j in range(0, len(fields), 4) if fields[j] != "cls"), None)
        if image is None or len(image) != 4:
            raise DataError(f"{path}: malformed line {line!r}")
        names.append(image[3].encode())
        offsets.append(int(image[1])), sizes.append(int(image[2]))
    return b"".join(names), [len(x) for x in names], offsets, sizes


def test_idx_parsed_in_numpy_as_line_by_line_on_odd_names(tmp_path):
    src = make_image_folder(tmp_path / "src", classes=2, per_class=4)
    odd = ["a b.c.JPG", "ünï cödé.jpeg", "x.y.z.png", ".hidden.jpg", "-1.jpg"]
    for k, name in enumerate(odd):
        img = next((src / "train" / "class_00").glob("*.jpg"))
        if name.endswith(".png"):
            from PIL import Image
            Image.open(img).save(src / "train" / "class_01" / name)
        else:
            shutil.copy(img, src / "train" / "class_01" / name)
    out = tmp_path / "wds"
    assert convert.main(["webdataset", "--src", str(src), "--out", str(out), "--shard-size", "3"]) == 0
    idx = sorted((out / "train").glob("*.idx"))
    assert len(idx) == 4
    names = b""
    for path in idx:
        blob, lengths, offsets, sizes = _read_idx(path)
        want = idx_by_line(path)
        assert blob == want[0] and lengths.tolist() == want[1]
        assert offsets.tolist() == want[2] and sizes.tolist() == want[3]
        assert lengths.dtype == offsets.dtype == sizes.dtype == np.int64
        names += blob
    assert "ünï_cödé.jpg".encode() in names and b"x_y_z.png" in names
    # lines another writer may give: the label first, no label, a last line without its newline
    other = tmp_path / "other.idx"
    other.write_text("v1.2 3\ncls 1 1 a.cls jpg 512 9 a.jpg\npng 1024 3 b.png\r\njpg 2048 4 c.jpg cls 9 1 c.cls")
    blob, lengths, offsets, sizes = _read_idx(other)
    assert (blob, lengths.tolist(), offsets.tolist(), sizes.tolist()) == \
        (b"a.jpgb.pngc.jpg", [5, 5, 5], [512, 1024, 2048], [9, 3, 4])
    assert idx_by_line(other)[0] == blob


@pytest.mark.parametrize("line", ["", "cls 1 1 a.cls", "jpg 1 2", "jpg 512 x a.jpg", "jpg 1 2 a.jpg extra 7"])
def test_a_malformed_idx_line_is_named(tmp_path, line):
    path = tmp_path / "bad.idx"
    path.write_text(f"v1.2 3\njpg 0 5 ok.jpg cls 9 1 ok.cls\n{line}\njpg 5 5 z.jpg\n")
    if line == "jpg 1 2 a.jpg extra 7":                      # a short component after the image is ignored
        assert _read_idx(path)[0] == b"ok.jpga.jpgz.jpg" == idx_by_line(path)[0]
        return
    with pytest.raises(DataError, match=f"malformed line '{line}'"):
        _read_idx(path)
    (tmp_path / "v.idx").write_text("v1.1 2\n")
    with pytest.raises(DataError, match="not a v1.2 webdataset index"):
        _read_idx(tmp_path / "v.idx")
