"""Loaders: files -> Batch(views, labels, indices) on the training device (contract: common.py).

Each loader is one module behind one name; `loader=` in the config picks it. DALI and FFCV are
imported only when their loader is built.
"""
from __future__ import annotations

import importlib

import masksiam  # noqa: F401  (makes torchvision importable first)

# name -> "module:factory"; a factory takes (cfg, info, split, train) and returns a Loader
LOADERS = {
    "torchvision": "pipelines.loaders.torchvision_loader:build",
    "dali": "pipelines.loaders.dali_loader:build",
    "ffcv": "pipelines.loaders.ffcv_loader:build",
    "synthetic": "pipelines.loaders.synthetic_loader:build",   # no input pipeline: bench.py's model ceiling
}


def build_loader(cfg, info, split: str | None = None, train: bool = True):
    """The loader named by cfg.loader for `split` (default cfg.train_split) on this rank."""
    if cfg.loader not in LOADERS:
        raise ValueError(f"unknown loader {cfg.loader!r}; choose one of {', '.join(LOADERS)}")
    module, factory = LOADERS[cfg.loader].split(":")
    return getattr(importlib.import_module(module), factory)(cfg, info, split or cfg.train_split, train)
