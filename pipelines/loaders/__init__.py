"""Loaders: files -> Batch(views, labels, indices) on the training device (contract: common.py).

    loader = build_loader(cfg, info, split="train", train=True)

`loader=` in the config picks one of LOADERS. Each factory takes (cfg, spec, split): the spec
(spec.py) holds every setting derived from the config; the config gives only what is the loader's
own (its data path and backend options). Each factory imports its module when called, so DALI and
FFCV are imported only when their loader is built.
"""
from __future__ import annotations

import masksiam  # noqa: F401  (makes torchvision importable first)
from masksiam.config import ConfigError
from pipelines.loaders.spec import LoaderSpec, loader_spec


def _torchvision(cfg, spec: LoaderSpec, split: str):
    from pipelines.loaders import torchvision_loader
    return torchvision_loader.build(cfg, spec, split)


def _dali(cfg, spec: LoaderSpec, split: str):
    from pipelines.loaders import dali_loader
    return dali_loader.build(cfg, spec, split)


def _ffcv(cfg, spec: LoaderSpec, split: str):
    from pipelines.loaders import ffcv_loader
    return ffcv_loader.build(cfg, spec, split)


def _synthetic(cfg, spec: LoaderSpec, split: str):
    from pipelines.loaders import synthetic_loader
    return synthetic_loader.build(cfg, spec, split)


LOADERS = {
    "torchvision": _torchvision,   # the reference: PIL in DataLoader workers
    "dali": _dali,                 # NVIDIA DALI: nvJPEG on GPUs, libjpeg-turbo on the CPU
    "ffcv": _ffcv,                 # a .beton (convert.py ffcv), one decode for every view
    "synthetic": _synthetic,       # no input pipeline: bench.py's model ceiling
}


def build_loader(cfg, info, split: str | None = None, train: bool = True):
    """The loader named by cfg.loader for `split` (default cfg.train_split) on this rank."""
    if cfg.loader not in LOADERS:
        raise ConfigError(f"unknown loader {cfg.loader!r}; choose one of {', '.join(LOADERS)}")
    return LOADERS[cfg.loader](cfg, loader_spec(cfg, info, train), split or cfg.train_split)
