"""Evaluation data through the training loader layer: image folders, .beton files, webdataset shards.

    check_eval_data(cfg) -> labelled                       # train.py at start-up: fail before training
    loader = eval_loader(cfg, info, cfg.val_split)         # resize + center crop, fixed order, one view
    loader = eval_loader(cfg, info, "train", train=True)   # one random resized crop + flip per image

Evaluation reads the split with the loader that `loader=` names, exactly as training does:
torchvision reads <data>/<split>/ (an ImageFolder), ffcv reads <data>/<split>.beton (or ffcv_path
with "{split}"), dali reads <data>/<split>/ as an ImageFolder or as webdataset shards (index.json).
`eval_source` is the one place that says which file or folder that is.

Labels: each split numbers its own sorted classes (pipelines/loaders/common.py's folder rules), so
every evaluation (and train.py before a run) compares the val split's class list with the train
split's and refuses a difference, naming the classes (`check_labels`). A flat folder of photos (or
a single class) is unlabelled: train.py pretrains on it without the probe and the kNN, and every
evaluation refuses it.

Subsets (semi-supervised fine-tuning) are positions in the split's sample list (`sample_names`),
written as an ImageFolder of links (`materialise_subset`; webdataset and .beton samples are copied
out), which a folder loader then reads like any split. A .beton stores no file names: its rows are
named '<class>/<row>.jpg', so subset lists of file names address folders and shards only.
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from masksiam.io import atomic_write, atomic_write_text
from pipelines.loaders import build_loader
from pipelines.loaders.common import (CLASS_LIST, UNLABELLED, DataError, compare_classes, find_classes, has_labels,
                                      split_dir)

# what evaluation may read, per loader; synthetic data needs no files
_FORMATS = {"torchvision": "an ImageFolder <data>/<split>/<class>/<image>",
            "dali": "an ImageFolder or webdataset shards (convert.py webdataset) in <data>/<split>/",
            "ffcv": "a .beton <data>/<split>.beton (convert.py ffcv) or ffcv_path with '{split}'"}


def eval_source(cfg, split: str) -> Path | None:
    """The file or folder the configured loader reads for `split` (None: synthetic data)."""
    if cfg.loader == "synthetic":
        return None
    if cfg.loader == "ffcv":
        from pipelines.loaders.ffcv_loader import beton_path   # no FFCV import: a path rule only
        return beton_path(cfg, split)
    return Path(cfg.data) / split


def _keys(cfg, split_key: str) -> str:
    keys = f"loader={cfg.loader}, data={cfg.data}, {split_key}={getattr(cfg, split_key)}"
    if cfg.loader == "ffcv" and cfg.ffcv_path:
        keys += f", ffcv_path={cfg.ffcv_path}"
    return keys


def _exists(cfg, path: Path | None) -> bool:
    """Whether cfg.loader can read `path`: a file for ffcv, a folder for dali, a folder that is not
    webdataset shards for torchvision (it reads ImageFolders only)."""
    if path is None:
        return True
    if cfg.loader == "ffcv":
        return path.is_file()
    return path.is_dir() and (cfg.loader == "dali" or not (path / "index.json").is_file())


def _why(cfg, path: Path) -> str:
    if cfg.loader == "torchvision" and (path / "index.json").is_file():
        return "which holds webdataset shards: the torchvision loader reads ImageFolders, use loader=dali"
    return "which does not exist"


def check_split(cfg, split_key: str, role: str) -> None:
    """Raise DataError unless the split named by config key `split_key` exists for cfg.loader."""
    path = eval_source(cfg, getattr(cfg, split_key))
    if not _exists(cfg, path):
        raise DataError(f"evaluation data missing: {role} reads {path}, {_why(cfg, path)} "
                        f"({_keys(cfg, split_key)}; loader={cfg.loader} expects {_FORMATS[cfg.loader]}). "
                        f"Create it, point data / {split_key} at it, or turn evaluation off "
                        f"(final_eval=false knn_every=0)")


def _require(cfg, split: str) -> None:
    path = eval_source(cfg, split)
    if not _exists(cfg, path):
        raise DataError(f"evaluation split {split!r} missing: {path} {_why(cfg, path)} (loader={cfg.loader}, "
                        f"data={cfg.data}; loader={cfg.loader} expects {_FORMATS[cfg.loader]})")


def split_classes(cfg, split: str) -> list[str]:
    """The class list cfg.loader will number for `split`, read cheaply before any loader is built:
    a folder's top level (common.find_classes: the folder rules), a webdataset index, a .beton's
    sidecar. [UNLABELLED] for a flat folder of photos."""
    path = eval_source(cfg, split)
    if path is None:
        return [str(c) for c in range(1000)]                    # synthetic: labelled, as its loader
    if cfg.loader == "ffcv":
        import json
        sidecar = path.with_name(path.name + ".json")           # convert.py ffcv's report: no FFCV import
        if sidecar.is_file():
            return list(json.loads(sidecar.read_text())["classes"])
        from ffcv.reader import Reader
        from pipelines.loaders.ffcv_loader import _classes
        try:
            reader = Reader(str(path))
        except Exception as err:  # noqa: BLE001  (FFCV raises IndexError, ValueError... on a bad header)
            raise DataError(f"cannot read the FFCV file {path}: {type(err).__name__}: {err}") from err
        return _classes(path, reader)
    from pipelines.loaders.samples import is_webdataset, read_index
    return read_index(path)["classes"] if is_webdataset(path) else find_classes(split_dir(cfg.data, split))


def _unlabelled(path: Path, classes: list[str]) -> str:
    what = "a flat folder of images, no class folders" if classes == [UNLABELLED] else f"one class, {classes[0]!r}"
    return f"{path} is unlabelled ({what})"


def check_eval_data(cfg) -> bool:
    """Start-up check for train.py; returns whether the train split is labelled (two classes or
    more), i.e. whether the online probe and the kNN evaluation can run at all.

    For a labelled run that evaluates (final_eval or knn_every), raises DataError (naming the path
    and the config keys) when the kNN will read a split that is not there, or when the train and
    val splits number different classes, so a run fails before training instead of after it."""
    evaluates = cfg.final_eval or cfg.knn_every
    if evaluates:
        check_split(cfg, "train_split", "the kNN memory bank (train_split)")
    elif not _exists(cfg, eval_source(cfg, cfg.train_split)):
        return True                         # the training loader names what is missing
    classes = split_classes(cfg, cfg.train_split)
    if not has_labels(classes):
        return False                        # no val split needed: nothing will be evaluated
    if evaluates:
        check_split(cfg, "val_split", "the kNN queries (val_split)")
        _compare(cfg, classes, cfg.val_split)
    return True


def unlabelled_note(cfg) -> str:
    """The one line train.py prints for an unlabelled train split."""
    classes = split_classes(cfg, cfg.train_split)
    return (f"{_unlabelled(eval_source(cfg, cfg.train_split), classes)}: self-supervised pretraining "
            "only; the online probe and the kNN evaluation are off (they need class folders)"
            + ("; backbone.pt and curves.png are written as usual" if cfg.final_eval else ""))


def _compare(cfg, train_classes: list[str], split: str) -> None:
    compare_classes(train_classes, split_classes(cfg, split), f"{cfg.train_split} ({eval_source(cfg, cfg.train_split)})",
                    f"{split} ({eval_source(cfg, split)})")


def check_labels(cfg, split: str) -> None:
    """An evaluation reads labelled splits whose class lists agree: raise DataError for an
    unlabelled split, or one whose classes differ from the train split's (labels would shift)."""
    if cfg.loader == "synthetic":
        return
    classes = split_classes(cfg, split)
    if not has_labels(classes):
        raise DataError(f"{_unlabelled(eval_source(cfg, split), classes)}: evaluation needs labels, "
                        f"<split>/<class>/<image> with two classes or more (loader={cfg.loader}, data={cfg.data})")
    if split != cfg.train_split and _exists(cfg, eval_source(cfg, cfg.train_split)):
        _compare(cfg, split_classes(cfg, cfg.train_split), split)


def detect_loader(cfg, split: str) -> str:
    """The loader for `cfg.data` when the configured one cannot read it: a checkpoint trained from
    .beton files evaluated on a folder, or the reverse. Keeps cfg.loader when its data is there."""
    if cfg.loader == "synthetic":
        return cfg.loader
    if _exists(cfg, eval_source(cfg, split)):
        return cfg.loader
    folder = Path(cfg.data) / split
    if (Path(cfg.data) / f"{split}.beton").is_file():
        return "ffcv"
    if (folder / "index.json").is_file():
        return "dali"                       # webdataset shards: the DALI loader reads them
    if folder.is_dir():
        return "torchvision"
    return cfg.loader                       # nothing there: let check_split name what is missing


def eval_loader(cfg, info, split: str, *, train: bool = False, batch_size: int | None = None,
                max_images: int = 0):
    """One view per image through cfg.loader: train=False the eval crop (resize + center crop,
    fixed order, every image once per rank set), train=True a random resized crop + flip.

    batch_size is global (default cfg.batch_size, rounded to a multiple of the world size)."""
    batch = batch_size or cfg.batch_size
    batch = max(info.world_size, batch // info.world_size * info.world_size)
    # one view: a multi-crop run's `crops` groups do not apply to evaluation
    cfg = dataclasses.replace(cfg, batch_size=batch, views=1, max_images=max_images,
                              drop_last=False if not train else cfg.drop_last, crops="")
    _require(cfg, split)
    check_labels(cfg, split)
    return build_loader(cfg, info, split, train)


class BetonSamples:
    """A .beton as a sample source (names, labels, classes, read, describe) for subsets: row i is
    named '<class>/<row>.jpg' (JPEG rows: their stored bytes) or '.png' (raw rows, encoded here).
    A .beton keeps no file names, so subset lists of file names cannot address it."""

    def __init__(self, path: Path):
        import json
        from ffcv.reader import Reader
        self.path, reader = Path(path), Reader(str(path))
        fields = list(reader.handlers)
        self._meta = reader.metadata[f"f{fields.index('image')}"]
        labels = reader.metadata[f"f{fields.index('label')}"]
        self.labels = [int(v) for v in labels]
        sidecar = self.path.with_name(self.path.name + ".json")       # convert.py ffcv's report
        self.classes = (list(json.loads(sidecar.read_text())["classes"]) if sidecar.is_file()
                        else [str(c) for c in range(max(self.labels) + 1)])
        table = reader.alloc_table[np.argsort(reader.alloc_table["ptr"])]
        self._ptrs, self._sizes = table["ptr"], table["size"]
        self.names = [f"{self.classes[y]}/{i:08d}.{'png' if int(m['mode']) == 1 else 'jpg'}"
                      for i, (y, m) in enumerate(zip(self.labels, self._meta))]

    def __len__(self) -> int:
        return len(self.labels)

    def read(self, i: int) -> np.ndarray:
        m = self._meta[i]
        ptr = int(m["data_ptr"])
        size = int(self._sizes[np.searchsorted(self._ptrs, ptr)])
        payload = np.fromfile(self.path, np.uint8, count=size, offset=ptr)
        if int(m["mode"]) == 1:                                           # raw (H, W, 3) pixels
            import io
            from PIL import Image
            buf = io.BytesIO()
            Image.fromarray(payload[:int(m["height"]) * int(m["width"]) * 3].reshape(
                int(m["height"]), int(m["width"]), 3)).save(buf, format="PNG")
            return np.frombuffer(buf.getvalue(), np.uint8)
        return payload

    def describe(self, i: int) -> str:
        return f"{self.path}:row {i}"


def _samples(cfg, split: str):
    _require(cfg, split)
    if cfg.loader == "ffcv":
        return BetonSamples(eval_source(cfg, split))
    from pipelines.loaders.samples import open_split
    return open_split(Path(cfg.data) / split)


def sample_names(cfg, split: str) -> tuple[list[str], list[int], list[str]]:
    """(names, labels, classes) of the whole split in loader order; names are '<class>/<file>'."""
    samples = _samples(cfg, split)
    return list(samples.names), list(samples.labels), list(samples.classes)


def materialise_subset(cfg, split: str, indices: np.ndarray, dest: str | Path):
    """An ImageFolder dest/<split>/<class>/<file> of the chosen samples (symbolic links to the
    images of a folder; the bytes of webdataset and .beton samples), every class folder present so
    labels keep their numbers; returns cfg reading it (a .beton's subset through the torchvision
    loader). Rank 0 writes, the others wait for it."""
    from masksiam import dist
    check_labels(cfg, split)
    root = Path(dest) / split
    if dist.rank() == 0:
        samples = _samples(cfg, split)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
        if has_labels(samples.classes):     # the class list, kept where the subset has no image of a class
            atomic_write_text(root / CLASS_LIST, "".join(c + "\n" for c in samples.classes))
        for i in indices:
            name = samples.names[int(i)]
            target = root / name                     # '<class>/<file>', nested folders kept
            target.parent.mkdir(parents=True, exist_ok=True)
            source = Path(samples.describe(int(i)))
            if source.is_file():
                target.symlink_to(source.resolve())
            else:
                atomic_write(target, lambda f, data=samples.read(int(i)): f.write(data.tobytes()))
    dist.barrier()
    return dataclasses.replace(cfg, data=str(dest), loader="dali" if cfg.loader == "dali" else "torchvision")
