"""SSL methods: one file each (the whole method: heads, pure loss, per-step hook, state), one registry.

    method = build_method(cfg, backbone, mixes)     # an nn.Module; the same calls for every method:
    loss, logs = method(out)                        # out: the augment stage's AugmentOutput
    method.after_step(step, total_steps)            # after optimizer.step(): EMA target, queue push
    method.backbone                                 # the torchvision ResNet that eval and export use
    method.state_dict()                             # everything it holds: heads, target, queue

A method owns its config keys: its class names a frozen dataclass `Settings` (losses/common.py:
Settings, with the shared parts Heads and EMA to compose) whose fields are the keys, with the
paper's defaults and RULES for their ranges. A run's config gives them flat (`temperature: 0.1`)
and masksiam/config.py collects them in cfg.method_args, refusing a key of another method; the
method gets them resolved as the dict `hp` (losses.common.hparams). Adding a method: its file (an
nn.Module with name, Settings, forward(out) -> (loss, logs), after_step, backbone), an entry in
METHODS, a recipe and a config; nothing in train.py or the shared Config.

The Siamese methods share losses/siamese.py (an online network, optionally its EMA target);
MixMask / Un-Mix is losses/mixed.py's `Mixed` wrapper around any of them; losses/common.py holds
the helpers and the conventions every pure loss follows.
"""
from __future__ import annotations

from losses.barlow import BarlowTwins
from losses.byol import BYOL
from losses.common import Embeddings, hparams, settings  # noqa: F401  (the API tests and tools use)
from losses.mixed import Mixed
from losses.mixmae import MixMAE
from losses.moco import MoCo
from losses.simclr import SimCLR
from losses.simmim import SimMIM
from losses.simsiam import SimSiam
from losses.vicreg import VICReg
from masksiam.config import ConfigError

METHODS = {
    "simclr": SimCLR,
    "moco": MoCo,
    "byol": BYOL,
    "simsiam": SimSiam,
    "barlow": BarlowTwins,
    "vicreg": VICReg,
    "simmim": SimMIM,
    "mixmae": MixMAE,
}


def get_method(name: str):
    """The method class registered under `name` (ConfigError naming the valid ones)."""
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r} (config key 'method'); choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg, backbone, mixes: bool = False):
    """The method of cfg.method for `backbone`, its settings from cfg.method_args (paper defaults
    where unset); wrapped in Mixed (weight cfg.mix_weight) when the recipe mixes images (MixMask, Un-Mix)."""
    cls = get_method(cfg.method)
    method = cls(backbone, hparams(cls, cfg), cfg)
    if mixes:
        if not hasattr(method, "embed"):
            raise ConfigError(f"method {cfg.method!r} does not take mixed images (recipe {cfg.recipe!r}, "
                              f"config key 'mix'); MixMask / Un-Mix apply to Siamese methods")
        method = Mixed(method, cfg.mix_weight)
    return method


def shape_keys(method) -> tuple[str, ...]:
    """The config keys that decide the shapes of a method's tensors (checkpoint compatibility)."""
    inner = getattr(method, "method", method)
    return tuple(getattr(inner, "SHAPE_KEYS", ()))
