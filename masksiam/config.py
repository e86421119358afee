"""A flat, typed run configuration: one dataclass, yaml files, `key=value` overrides.

    cfg = load_config("configs/demo.yaml", ["lr=0.5", "epochs=3"])

A yaml file may start from another with `base: other.yaml` (a path relative to the file). Every key is a field of `Config` with a type; yaml values and overrides are checked against it.
An unknown key or a value of the wrong type stops with an error that names the key, the file (or
"command line") it came from and the valid keys. A method's own keys (temperature, projector sizes,
...) are not Config fields: its file in losses/ declares them (a `Settings` dataclass with defaults
and ranges). Given flat or under `method_args:`, they are collected in `cfg.method_args`;
load_config refuses one the selected method does not have (naming the method that has it) or out of
its range, naming the file it came from.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field, fields
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
    read_order: Literal["auto", "sample", "shard"] = "auto"   # training order (README "Read order"): sample =
                                           # one permutation of every sample per epoch; shard = shuffled shards,
                                           # whole shards per rank, a shuffle buffer (FFCV: quasi_random);
                                           # auto = shard for webdataset shards that mix the classes, at least
                                           # 4 buffers and 2 shards per rank; sample otherwise
    shuffle_buffer: int = 10_000           # read_order=shard: buffer slots (samples; at most a rank's share)
    dali_device: Literal["auto", "gpu", "cpu"] = "auto"   # decoder: mixed (nvJPEG) or cpu
    ffcv_path: str = ""                    # .beton of the train split ("" = <data>/train.beton)
    ffcv_order: Literal["auto", "random", "quasi_random", "sequential"] = "auto"   # auto: read_order decides
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
    stem: Literal["auto", "imagenet", "small", "simmim"] = "auto"   # auto: small 3x3 stem when size <= 64;
                                           # simmim: 3x3/2 conv + 2x2 max-pool (SimMIM's ResNet, stride 4)
    channels_last: bool = True
    sync_bn: bool = False
    zero_init_residual: bool = True
    # ---- method ---------------------------------------------------------------------------------
    method: str = "simclr"
    method_args: dict = field(default_factory=dict)   # the method's own keys (losses/<method>.py Settings):
                                           # given flat (`temperature: 0.1`) or under `method_args:`;
                                           # a run's config.yaml holds all of them, defaults filled in
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


def _order_keys(d: dict[str, Any]) -> dict[str, Any]:
    """`d` with ffcv_order=auto written as the FFCV order it gives (LoaderSpec.ffcv_order's rule), so
    `ffcv_order: random` from before `auto` existed equals auto under read_order auto or sample. The
    order a loader resolved (auto -> sample or shard) is compared in the resume record
    (run_checkpoint.resume_record), which depends on the data too."""
    if d.get("ffcv_order") == "auto":
        d = {**d, "ffcv_order": "quasi_random" if d.get("read_order") == "shard" else "random"}
    return d


def flat(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config (to_dict) with its method's keys laid out beside the shared ones, as checkpoints
    written before `method_args` held them."""
    return {**{k: v for k, v in d.items() if k != "method_args"}, **(d.get("method_args") or {})}


def resume_changes(saved: dict[str, Any], cfg: "Config") -> list[str]:
    """The keys of `cfg` that differ from the checkpoint's config `saved` (to_dict) and may not
    change on resume, as "key=saved (this run: value)"; a method key counts as any other. Keys the
    checkpoint does not know (added since it was written) are not compared."""
    now, saved = _order_keys(flat(to_dict(cfg))), _order_keys(flat(saved))
    return [f"{k}={saved[k]!r} (this run: {v!r})" for k, v in now.items()
            if k not in RESUME_MAY_CHANGE and k in saved and saved[k] != v]


def valid_keys() -> list[str]:
    return [f.name for f in fields(Config)]


def method_keys() -> dict[str, dict[str, Any]]:
    """{key: {method name: its type}} over the registered methods' Settings (losses.METHODS)."""
    from losses import METHODS     # here: losses imports this module
    out: dict[str, dict[str, Any]] = {}
    for name, cls in METHODS.items():
        for key, typ in typing.get_type_hints(cls.Settings).items():
            if key in {f.name for f in fields(cls.Settings)}:
                out.setdefault(key, {})[name] = typ
    return out


def _unknown_key_error(key: str, where: str) -> ConfigError:
    keys = valid_keys() + sorted(method_keys())
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


def apply(cfg: Config, values: dict[str, Any], where: str, origins: dict[str, str] | None = None) -> Config:
    """Return a copy of `cfg` with `values` applied, each checked against its field's type. A key
    that is no Config field but some method's (flat, or inside `method_args:`) goes to
    cfg.method_args, typed as that method declares it (None: back to its default); origins[key]
    records `where` for it."""
    hints = _field_types()
    keys = set(valid_keys())
    updates, method_args = {}, dict(cfg.method_args)
    own = {k: v for k, v in values.items() if k in keys and k != "method_args"}
    args = {k: v for k, v in values.items() if k not in keys}
    if "method_args" in values:
        if not isinstance(values["method_args"], dict):
            raise ConfigError(f"config key 'method_args' in {where}: expected a mapping of the method's keys, "
                              f"got {values['method_args']!r}")
        args.update(values["method_args"])
    for key, value in own.items():
        updates[key] = _coerce(key, hints[key], value, where)
    if args:
        known = method_keys()
        for key, value in args.items():
            if key not in known:
                raise _unknown_key_error(key, where)
            if value is None:               # "the method's default" (configs and checkpoints before method_args)
                method_args.pop(key, None)
                continue
            method_args[key] = _coerce(key, next(iter(known[key].values())), value, where)
            if origins is not None:
                origins[key] = where
        updates["method_args"] = method_args
    return dataclasses.replace(cfg, **updates)


def check_method_args(cfg: Config, origins: dict[str, str] | None = None) -> None:
    """Each of cfg.method_args is a key of cfg.method's Settings and in its range; the error names the
    key, the method that has it and where it came from (origins: key -> file / "command line")."""
    from losses import get_method, settings   # here: losses imports this module
    cls = get_method(cfg.method)
    origins = origins or {}
    for key in cfg.method_args:
        if key not in {f.name for f in fields(cls.Settings)}:
            owners = sorted(method_keys().get(key, {}))
            raise ConfigError(f"config key {key!r} in {origins.get(key, 'the config')} is not a setting of method "
                              f"{cfg.method!r} (it belongs to {', '.join(repr(o) for o in owners)})")
    settings(cls, cfg, origins)


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the yaml file (and its `base` files), then key=value overrides; then the
    method's keys checked against the method finally selected. A layer (file, command line) that
    names another method drops the keys earlier layers gave that it does not have (a base config's
    `temperature` under `method: barlow`); keys given with or after it must be its own."""
    layers = read_layers(Path(path), error=ConfigError, what="config file") if path else []
    layers = [(str(layer), values) for layer, values in layers]
    if overrides:
        layers.append(("command line", parse_overrides(overrides)))
    cfg, origins = Config(), {}
    for where, values in layers:
        before = cfg.method
        cfg = apply(cfg, values, where, origins)
        if cfg.method != before:
            from losses import get_method   # here: losses imports this module
            own = {f.name for f in fields(get_method(cfg.method).Settings)}
            kept = {k: v for k, v in cfg.method_args.items() if k in own or origins.get(k) == where}
            cfg = dataclasses.replace(cfg, method_args=kept)
    check_method_args(cfg, origins)
    return cfg


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return list(v)
    return {k: _plain(x) for k, x in v.items()} if isinstance(v, dict) else v


def to_dict(cfg: Config) -> dict[str, Any]:
    return {k: _plain(getattr(cfg, k)) for k in valid_keys()}


def save_config(cfg: Config, path: str | Path) -> None:
    from masksiam.io import atomic_write_text
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
