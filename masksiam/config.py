"""A flat, typed run configuration: one dataclass, yaml files, `key=value` overrides.

    cfg = load_config("configs/demo.yaml", ["lr=0.5", "epochs=3"])

A yaml file may start from another with `base: other.yaml` (a path relative to the file). Every key is a field of `Config` with a type; yaml values and overrides are checked against it.
An unknown key or a value of the wrong type stops with an error that names the key, the file (or
"command line") it came from and the valid keys. Method-specific keys default to None, meaning "the
method's own default" (see losses/); `resolve_method_defaults` fills them in so the resolved config
written next to a run shows the values actually used.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from masksiam.errors import UserError
from masksiam.yamlio import coerce, read_layers


class ConfigError(UserError, ValueError):
    """A config file or override is wrong; the message names the key and where it came from."""
    exit_code = 2


@dataclass
class Config:
    # ---- run ------------------------------------------------------------------------------------
    out_dir: str = "runs"                  # runs are written to out_dir/run_name/
    run_name: str = ""                     # "" = a new run <method>-<arch>-<YYYYmmdd-HHMMSS> (under torchrun:
                                           # its rdzv id instead of the time); resume=true needs the name
    seed: int = 0
    resume: bool = False                   # continue from run_dir/checkpoint.pt when it exists
    log_every: int = 20                    # steps between metric logs (the only host syncs), and the
                                           # last step of each epoch and of the run
    ckpt_every: int = 1                    # epochs between checkpoints and at the end (0 = never: benchmarks)
    max_steps: int = 0                     # stop after this many optimizer steps (0 = no limit)
    progress: bool = True                  # progress bar on rank 0
    max_bad_steps: int = 10                # stop after this many non-finite losses in a row
    keep_checkpoints: int = 2              # checkpoint.pt and the previous ones (checkpoint.1.pt, ...): a resume
                                           # falls back to the newest readable one

    # ---- data -----------------------------------------------------------------------------------
    data: str = "data/fashion-mnist"       # ImageFolder root with train/ and val/ inside
    train_split: str = "train"
    val_split: str = "val"
    loader: Literal["torchvision", "dali", "ffcv", "synthetic"] = "torchvision"
    workers: int = 4                       # CPU workers / threads per rank for the loader
    batch_size: int = 256                  # global batch, split evenly across ranks
    views: int = 2                         # crops per image from one decode
    crops: str = ""                        # multi-crop: "2x224@0.14-1,6x96@0.05-0.14" (COUNTxSIZE@SCALE, in
                                           # Batch.views order); "" = views x size at crop_scale
    size: int = 224                        # output crop size (px)
    crop_scale: tuple[float, float] = (0.08, 1.0)   # RandomResizedCrop area fraction
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    flip_prob: float = 0.5                 # horizontal flip, applied per view in the loader
    drop_last: bool = True
    prefetch: int = 2                      # batches prepared ahead per worker / pipeline
    max_images: int = 0                    # use only N images of a split, spread over it (0 = all)
    bad_images: Literal["skip", "stop"] = "skip"   # an unreadable image: replace it by the next of its
                                           # class folder / shard (named in metrics.jsonl), or stop the run
    max_bad_images: int = 100              # skip: stop once more distinct images than this were bad
    dali_device: Literal["auto", "gpu", "cpu"] = "auto"   # decoder: mixed (nvJPEG) or cpu
    ffcv_path: str = ""                    # .beton of the train split ("" = <data>/train.beton)
    ffcv_order: Literal["random", "quasi_random", "sequential"] = "random"
    ffcv_os_cache: bool = True
    ffcv_fused: bool = True                # decode each image once for all of its views

    # ---- augmentation (batched, on the training device) -----------------------------------------
    recipe: str = "simclr"                 # name in pipelines/augment/recipes/ or a yaml path
    mix: Literal["none", "mixmask", "unmix"] = "none"   # add this mixing to a recipe without one ("none": the recipe's own)
    highpass_eval: Optional[bool] = None   # high-pass kNN / eval inputs (None: when the recipe high-passes, MSCN)
    augment_ahead: bool = True             # augment batch k+1 while batch k trains (a side stream on CUDA)

    # ---- model ----------------------------------------------------------------------------------
    arch: str = "resnet50"
    width: int = 64                        # channels of the stem and layer1 (torchvision: 64); CPU demos use less
    stem: Literal["auto", "imagenet", "small"] = "auto"   # auto: small 3x3 stem when size <= 64
    channels_last: bool = True
    sync_bn: bool = False
    zero_init_residual: bool = True
    proj_hidden: Optional[int] = None      # None = the method's default
    proj_dim: Optional[int] = None
    proj_layers: Optional[int] = None
    pred_hidden: Optional[int] = None      # predictor (BYOL, SimSiam); 0 = none
    proj_bn: Optional[bool] = None         # BatchNorm after the projector's hidden layers
    proj_last_bn: Optional[bool] = None    # affine-free BatchNorm after its last layer (SimCLR, SimSiam)

    # ---- method ---------------------------------------------------------------------------------
    method: str = "simclr"
    temperature: Optional[float] = None
    ema_momentum: Optional[float] = None   # BYOL / MoCo target, start of the cosine schedule
    ema_schedule: Optional[Literal["cosine", "constant"]] = None   # cosine to 1 (BYOL) or constant (MoCo v2)
    moco_symmetric: Optional[bool] = None  # MoCo: both views as queries (MoCo v2+/v3), default asymmetric
    queue_size: Optional[int] = None       # MoCo negatives
    lambd: Optional[float] = None          # Barlow Twins off-diagonal weight
    sim_coeff: Optional[float] = None      # VICReg invariance
    std_coeff: Optional[float] = None      # VICReg variance
    cov_coeff: Optional[float] = None      # VICReg covariance
    mim_encoder: Optional[Literal["dense", "sparse"]] = None   # SimMIM: mask token after the stem, or SparK-style
    mim_fill: Optional[Literal["none", "zero", "mean"]] = None  # SimMIM dense: masked pixels before the stem
    decoder_depth: Optional[int] = None    # SimMIM / MixMAE: 3x3 conv blocks before the pixel head (0 = linear)
    decoder_dim: Optional[int] = None      # their width
    norm_pix_loss: Optional[bool] = None   # MIM target: per-patch normalised pixels (MAE / MixMIM)
    lut_weight: Optional[float] = None     # LUT broader-context loss weight (0 = off; seed 003: 0.25)
    lut_momentum: Optional[float] = None   # its EMA teacher's momentum (start of the cosine schedule)
    mix_weight: float = 1.0                # weight of the mixed loss term

    # ---- optimisation ---------------------------------------------------------------------------
    optimizer: Literal["sgd", "lars", "adamw"] = "lars"
    lr: float = 0.3                        # base lr per 256 images; see lr_scaling
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    weight_decay: float = 1e-6
    momentum: float = 0.9
    adamw_betas: tuple[float, float] = (0.9, 0.999)   # AdamW's (beta1, beta2); MixMAE / MAE: (0.9, 0.95)
    epochs: int = 100
    warmup_epochs: float = 10.0
    min_lr_ratio: float = 0.0              # cosine floor as a fraction of the peak lr
    grad_clip: float = 0.0                 # max global grad norm (0 = off)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"   # auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False                  # torch.compile the model

    # ---- evaluation -----------------------------------------------------------------------------
    online_probe: bool = True              # linear probe on detached features during pretraining (probe_top1)
    knn_every: int = 0                     # epochs between kNN monitors (0 = only at the end)
    final_eval: bool = True                # kNN, exported backbone and plot at the end of the run
    knn_k: int = 200
    knn_t: float = 0.1
    knn_max_train: int = 0                 # cap the kNN memory bank (0 = whole train split)
    knn_max_val: int = 0
    eval_size: int = 0                     # kNN input size (0 = size)


# What a resume may change: where the run is written and how it logs and checkpoints, how fast
# the data is read, and the evaluation. Every other key decides the steps themselves (the loader's
# order and position, the lr schedule, augmentation, model, optimizer): a resume that changes one
# is refused, naming it. The data may move (data, train_split, ffcv_path): the checkpoint records
# the training images (number and names) and the world size, and those must match instead.
RESUME_MAY_CHANGE = frozenset({
    "out_dir", "run_name", "resume", "log_every", "ckpt_every", "max_steps", "progress", "max_bad_steps",
    "keep_checkpoints",
    "data", "train_split", "val_split", "ffcv_path", "workers", "prefetch", "bad_images", "max_bad_images",
    "dali_device", "ffcv_os_cache", "compile",
    "online_probe", "knn_every", "final_eval", "knn_k", "knn_t", "knn_max_train", "knn_max_val", "eval_size",
    "highpass_eval",
})


def resume_changes(saved: dict[str, Any], cfg: "Config") -> list[str]:
    """The keys of `cfg` that differ from the checkpoint's config `saved` (to_dict) and may not
    change on resume, as "key=saved (this run: value)". Keys the checkpoint does not know (added
    since it was written) are not compared."""
    now = to_dict(cfg)
    return [f"{k}={saved[k]!r} (this run: {v!r})" for k, v in now.items()
            if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v]


def valid_keys() -> list[str]:
    return [f.name for f in fields(Config)]


def _unknown_key_error(key: str, where: str) -> ConfigError:
    keys = valid_keys()
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(keys)}")


def _coerce(key: str, typ: Any, value: Any, where: str) -> Any:
    """Check `value` against the annotation `typ`; convert the few safe cases (int->float, list->tuple)."""
    return coerce(value, typ, f"config key {key!r} in {where}", ConfigError)


_HINTS = None


def _field_types() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(Config)
    return _HINTS


def apply(cfg: Config, values: dict[str, Any], where: str) -> Config:
    """Return a copy of `cfg` with `values` applied, each checked against its field's type."""
    hints = _field_types()
    keys = set(valid_keys())
    updates = {}
    for key, value in values.items():
        if key not in keys:
            raise _unknown_key_error(key, where)
        updates[key] = _coerce(key, hints[key], value, where)
    return dataclasses.replace(cfg, **updates)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["lr=0.5", "crop_scale=[0.2,1]", "run_name=x"]` -> dict, values parsed as yaml scalars."""
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} on the command line is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        out[key] = yaml.safe_load(raw) if raw.strip() else ""
    return out


def _apply_file(cfg: Config, path: Path) -> Config:
    """Apply a yaml file; `base: other.yaml` (relative to the file) is applied first."""
    for layer, values in read_layers(path, error=ConfigError, what="config file"):
        cfg = apply(cfg, values, str(layer))
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the yaml file (and its `base` files), then key=value overrides."""
    cfg = Config()
    if path:
        cfg = _apply_file(cfg, Path(path))
    if overrides:
        cfg = apply(cfg, parse_overrides(overrides), "command line")
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    d = {k: getattr(cfg, k) for k in valid_keys()}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_config(cfg: Config, path: str | Path) -> None:
    from masksiam.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
