"""masksiam training: self-supervised pretraining of a ResNet, one script, read top to bottom.

    python train.py --config configs/demo_fmnist.yaml [key=value ...]          # one process
    torchrun --nproc_per_node=8 train.py --config configs/simclr_rn50_in1k.yaml     # DDP (nccl; gloo on CPU)

Sections of `main`: 1 config and run directory; 2 performance settings; 3 data and augmentation;
4 the method (network, heads, state); 5 optimizer; 6 resume; 7 the run record; 8 signals; 9 the
loop; 10 the end (checkpoint, kNN, plot).

A step (`train_step`): the loader hands crops per image (uint8, channels-last, on the device); the
augment stage turns them into float views (and masks / a mixed view); the method embeds them and
returns its loss; a non-finite loss skips the update on the device (no sync); then the method's
per-step hook (EMA target, queue). The loop never names a method-specific thing. The only host
syncs are at log intervals, checkpoints and evaluation.

Nothing is written before every check has passed (config, data, method, checkpoint compatibility,
what a resume may change: masksiam.config.RESUME_MAY_CHANGE): a refused start leaves the run
directory as it was. User errors exit with one line and code 2
(config) or 1 (data, checkpoint, a stopped run); see masksiam/errors.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import enum
import hashlib
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import masksiam  # noqa: F401  (torchvision importable on CPU torch)
from masksiam import checkpoint as ckpt_io
from masksiam import dist
from masksiam.config import ConfigError, load_config, resume_changes, save_config, to_dict
from masksiam.errors import ArgumentParser, UserError, exit_on_user_error
from masksiam.io import atomic_write, atomic_write_text
from masksiam.optim import build_optimizer, lr_at, peak_lr, set_lr
from masksiam.runinfo import write_run_info
from losses import build_method, get_method, hparams, shape_keys
from models.resnet import build_backbone_from_config, use_small_stem
from models.syncbn import convert_sync_batchnorm
from pipelines.augment.ahead import AugmentAhead
from pipelines.augment.engine import build_augmenter
from pipelines.loaders import build_loader
from pipelines.loaders.common import DataError, has_labels


class Exit(enum.Enum):
    """Why the loop ended."""
    FINISHED = "finished"
    MAX_STEPS = "max_steps"          # cfg.max_steps reached: a checkpoint, then the final evaluation
    SIGNAL = "signal"                # SIGTERM / SIGINT: a checkpoint at the step boundary, no evaluation
    NONFINITE = "nonfinite"          # max_bad_steps non-finite losses in a row: the last good checkpoint stays


class RunStopped(UserError):
    """The run could not go on (non-finite losses, a failed write); its checkpoint is kept."""


def parse_args(argv=None):
    p = ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="run config yaml (configs/*.yaml); keys as in masksiam/config.py")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=0.5 epochs=10")
    return p.parse_args(argv)


def main(argv=None, wrap: dict | None = None) -> dict:
    """wrap: {name: wrapper} for "build_loader", "build_augmenter", "build_method" and "train_step",
    wrapper(original) -> the replacement this call uses (bench.py's stage delays and sync guards)."""
    pieces = {"build_loader": build_loader, "build_augmenter": build_augmenter, "build_method": build_method,
              "train_step": train_step}
    pieces = SimpleNamespace(**{**pieces, **{name: w(pieces[name]) for name, w in (wrap or {}).items()}})
    # ---- 1. config and run directory (checked, not yet written) ---------------------------------
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    info = dist.init_distributed()
    hp = hparams(get_method(cfg.method), cfg)       # the method's hyper-parameters, defaults filled in
    cfg = dataclasses.replace(cfg, **{k: v for k, v in hp.items() if hasattr(cfg, k)})
    run = _RunDir.of(cfg)                           # resume, or refuse a run directory that has a checkpoint
    if not cfg.run_name:                            # resolved: config.yaml names the run to resume
        cfg = dataclasses.replace(cfg, run_name=run.dir.name)

    # ---- 2. performance settings (all in one place) --------------------------------------------
    perf = _performance(cfg, info)

    # ---- 3. data and augmentation --------------------------------------------------------------
    cfg = _check_eval_data(cfg)                     # unlabelled data: no probe, no kNN
    loader = pieces.build_loader(cfg, info)
    augment = pieces.build_augmenter(cfg.recipe, size=loader.spec.view_sizes, device=info.device,
                                     dtype=perf.aug_dtype, seed=cfg.seed, rank=info.rank, mix=cfg.mix,
                                     compile=cfg.compile)
    ahead = AugmentAhead(augment, enabled=cfg.augment_ahead)   # batch k+1 augmented while k trains
    if augment.sources != loader.spec.views:
        raise ConfigError(f"recipe {cfg.recipe!r} takes {augment.sources} crops per image but the loader makes "
                          f"{loader.spec.views} (config keys views / crops)")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise DataError(f"{cfg.data}/{cfg.train_split} has fewer images than one global batch "
                        f"({cfg.batch_size}); lower batch_size or set drop_last=false")
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, int(cfg.warmup_epochs * steps_per_epoch)

    # ---- 4. the method: backbone, heads, EMA target, queue: one module ---------------------------
    method = pieces.build_method(cfg, build_backbone_from_config(cfg), mixes=augment.recipe.mix is not None)
    if cfg.sync_bn and info.world_size > 1:        # BN statistics over the global batch
        method = convert_sync_batchnorm(method)
    method = method.to(info.device, memory_format=perf.memory_format)
    if cfg.compile:
        method.backbone.compile()                   # in place: state-dict keys stay torchvision's
    # sync_bn: GlobalBatchNorm keeps every rank's BN buffers equal, nothing to broadcast per forward;
    # gradients stay in DDP's all-reduce buckets (.grad views them: no copy, no second buffer)
    model = DDP(method, device_ids=[info.device.index] if perf.cuda else None, broadcast_buffers=not cfg.sync_bn,
                gradient_as_bucket_view=True) if info.world_size > 1 else method
    probe = _online_probe(cfg, method, loader, info.device)

    # ---- 5. optimizer --------------------------------------------------------------------------
    lr_peak = peak_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    optimizer = build_optimizer(method, cfg, lr_peak)

    # ---- 6. resume: everything a step depends on, checked against this run first -----------------
    ckpt = _Checkpoints(run.ckpt_path, cfg, info, method, optimizer, perf.scaler, ahead, probe,
                        record=_resume_record(loader, info))
    step, epoch, start_batch = ckpt.restore() if run.resume else (0, 0, 0)

    # ---- 7. the run record: written only now, after every check --------------------------------
    run.record(cfg, info, step)

    # ---- 8. the loop (SIGTERM / SIGINT: a checkpoint at the next step boundary, then exit) -------
    log = _Logger(run.metrics, info.is_main, cfg.progress)
    bad_in_row = torch.zeros((), device=info.device)   # consecutive non-finite losses, on the device
    bad_total = torch.zeros((), device=info.device)
    since_log = _Interval(info.device)
    exit, detail = Exit.FINISHED, "finished"
    if cfg.max_steps and step >= cfg.max_steps:     # a resumed run that already got there trains none
        exit, detail = Exit.MAX_STEPS, f"reached max_steps={cfg.max_steps}"
    with _log_closed(log), _StopOnSignal() as stop:
        while epoch < cfg.epochs and exit is Exit.FINISHED:
            loader.set_epoch(epoch, start_batch)
            log.start_epoch(epoch, steps_per_epoch, start_batch)
            batch_in_epoch, t_wait = start_batch, time.perf_counter()
            for batch, out in ahead.epoch(loader):  # out: float views (N,3,H,W) channels-last, masks, mix
                since_log.data += time.perf_counter() - t_wait
                lr = lr_at(step, total_steps, warmup_steps, lr_peak, cfg.min_lr_ratio)
                set_lr(optimizer, lr)
                loss, logs, nonfinite = pieces.train_step(model, optimizer, perf.scaler, perf.autocast, out,
                                                          cfg.grad_clip, probe, batch.labels)
                method.after_step(step, total_steps)   # EMA target, queue: every method's own hook
                bad_in_row = (bad_in_row + 1) * nonfinite
                bad_total += nonfinite
                since_log.add(torch.where(nonfinite, 0.0, loss.float()))
                step, batch_in_epoch = step + 1, batch_in_epoch + 1

                last_of_epoch = batch_in_epoch == steps_per_epoch
                last_step = bool(cfg.max_steps) and step >= cfg.max_steps
                # ranks must agree on entering this block (collectives inside): a signal cuts the
                # log interval short only in a single process. The steps since the last log_every
                # boundary are logged at the end of an epoch and of the run.
                if (step % cfg.log_every == 0 or last_of_epoch or last_step
                        or (stop.name and info.world_size == 1)):
                    n_bad = int(bad_in_row.item())  # the sync happens here, at log intervals only
                    log.step(step, epoch, lr, since_log.reduce(), _reduce_logs(logs), cfg.batch_size,
                             int(bad_total.item()), loader.bad_images)
                    since_log = _Interval(info.device)
                    if n_bad >= cfg.max_bad_steps:
                        exit, detail = Exit.NONFINITE, (f"stopped: {n_bad} non-finite losses in a row up to step "
                                                        f"{step}; the last good checkpoint {run.ckpt_path} is kept")
                        break
                    if dist.any_rank(stop.name is not None):
                        ckpt.save(step, epoch + last_of_epoch, 0 if last_of_epoch else batch_in_epoch)
                        epoch += last_of_epoch
                        exit, detail = Exit.SIGNAL, (f"stopped by {stop.name or 'a signal on another rank'}; "
                                                     f"checkpoint written at step {step}")
                        break
                if last_step:
                    exit, detail = Exit.MAX_STEPS, f"reached max_steps={cfg.max_steps}"
                    break
                t_wait = time.perf_counter()

            if exit in (Exit.NONFINITE, Exit.SIGNAL):
                break
            if batch_in_epoch == steps_per_epoch:
                epoch, start_batch = epoch + 1, 0
                if cfg.knn_every and epoch % cfg.knn_every == 0 and epoch < cfg.epochs:
                    log.knn(step, epoch, _knn(cfg, info, method.backbone))
                if cfg.ckpt_every and (epoch % cfg.ckpt_every == 0 or epoch == cfg.epochs):
                    ckpt.save(step, epoch, 0)
            else:                                   # max_steps inside an epoch
                if cfg.ckpt_every:
                    ckpt.save(step, epoch, batch_in_epoch)
                start_batch = batch_in_epoch

        # ---- 9. the end: kNN of the final backbone, exported weights, plot ---------------------
        result = {"run_dir": str(run.dir), "step": step, "epoch": epoch, "exit": detail,
                  "bad_images": sorted({b for bad in dist.all_gather_object(loader.bad_images) for b in bad})}
        if cfg.final_eval and exit in (Exit.FINISHED, Exit.MAX_STEPS):
            top1 = _final_eval(cfg, info, method.backbone, run, log, step, epoch, has_labels(loader.classes))
            if top1 is not None:
                result["knn_top1"] = top1
        if info.is_main:
            for bad in result["bad_images"]:
                print(f"train.py: skipped an unreadable image (bad_images=skip): {bad}", flush=True)
            print(json.dumps(result), flush=True)
            _write(run.dir / "result.json", lambda: atomic_write_text(run.dir / "result.json",
                                                                      json.dumps(result, indent=2)))
    dist.cleanup()
    if exit is Exit.NONFINITE:
        raise RunStopped(detail)
    return result


def train_step(model, optimizer, scaler, autocast, out, grad_clip: float = 0.0, probe=None, labels=None):
    """One optimizer step on the augment stage's output -> (loss (detached), logs, nonfinite).

    A non-finite loss (or gradient norm) skips the update on the device, on every rank together
    (an asynchronous all-reduce, no host sync). The online probe (if any) takes its own step on
    the features the forward left in its hook, detached."""
    with autocast:
        loss, logs = model(out)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    nonfinite = ~torch.isfinite(loss.detach())
    if dist.world_size() > 1:
        nonfinite = dist.all_reduce_max(nonfinite)
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        nonfinite |= ~torch.isfinite(grad_norm)
        logs = {**logs, "grad_norm": grad_norm.detach()}
    if scaler.is_enabled():                         # fp16: the scaler also skips inf/nan gradients
        scaler.step(optimizer, skip=nonfinite)
    else:
        optimizer.step(skip=nonfinite)              # skipped in-kernel: no sync, no NaN in the state
    scaler.update()
    if probe is not None:
        logs = {**logs, **probe.update_from_hook(labels)[1]}
    return loss.detach(), logs, nonfinite


# ---- helpers (used once each above; kept here so the loop reads top to bottom) ------------------

class _Perf(NamedTuple):
    cuda: bool
    autocast: torch.autocast
    scaler: torch.amp.GradScaler
    memory_format: torch.memory_format
    aug_dtype: torch.dtype


def _performance(cfg, info) -> _Perf:
    """Every performance setting of the run, in one place."""
    torch.manual_seed(cfg.seed)                     # same initial weights on every rank
    cuda = info.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True    # the losses turn it off for their matmuls
        torch.backends.cudnn.allow_tf32 = True
    # bf16 autocast on CUDA; on CPUs without native bf16 (AVX2) it is emulated and slower than fp32
    precision = ("bf16" if cuda else "fp32") if cfg.precision == "auto" else cfg.precision
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    return _Perf(cuda=cuda,
                 autocast=torch.autocast(info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
                 scaler=torch.amp.GradScaler(info.device.type, enabled=precision == "fp16"),
                 memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format,
                 # the augment stage writes bf16 on GPU (half the bandwidth into the first conv)
                 aug_dtype=torch.bfloat16 if precision == "bf16" and cuda else torch.float32)


@dataclasses.dataclass(frozen=True)
class _RunDir:
    """out_dir/run_name: config.yaml, run_info.json, metrics.jsonl, checkpoint.pt (+ older), results."""
    dir: Path
    resume: bool

    @property
    def ckpt_path(self) -> Path:
        return self.dir / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.jsonl"

    @classmethod
    def of(cls, cfg) -> "_RunDir":
        if cfg.keep_checkpoints < 1:
            raise ConfigError(f"config key 'keep_checkpoints' = {cfg.keep_checkpoints} must be >= 1")
        if not cfg.run_name and cfg.resume:
            raise ConfigError("resume=true needs the run_name of the run to continue (an empty run_name "
                              "starts a new run, named <method>-<arch>-<date>-<time>)")
        run_dir = Path(cfg.out_dir) / (cfg.run_name or f"{cfg.method}-{cfg.arch}-{_run_stamp()}")
        has_ckpt = ckpt_io.exists(run_dir / "checkpoint.pt", cfg.keep_checkpoints)
        elastic_restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if has_ckpt and not (cfg.resume or elastic_restart):
            raise ConfigError(f"{run_dir} already holds a checkpoint; pass resume=true to continue it, "
                              f"or choose another run_name / out_dir")
        return cls(run_dir, has_ckpt)

    def record(self, cfg, info, step: int) -> None:
        """The resolved config and run info; metrics past the checkpoint (a killed run's) dropped."""
        if info.is_main:
            self.dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.dir / "config.yaml")
            write_run_info(self.dir, {"world_size": info.world_size, "resumed": self.resume})
            _truncate_metrics(self.metrics, step)
        dist.barrier()


def _run_stamp() -> str:
    """The name part of a run without run_name: the start time, the same on every rank; under
    torchrun the rendezvous id instead, so that workers it restarts find their run again."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return os.environ["TORCHELASTIC_RUN_ID"]
    return dist.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))


def _resume_record(loader, info) -> dict:
    """What the loader's order and position depend on beyond the config: the world size (each rank's
    share of a batch and its own augment stream) and the training images, counted and, where the
    loader lists their names (an ImageFolder or webdataset index), hashed. A .beton is counted."""
    images = getattr(loader, "images", None) or getattr(loader, "samples", None)   # torchvision / DALI
    names = getattr(images, "paths", None) or getattr(images, "names", None)
    record = {"world_size": info.world_size}
    if names is not None:
        record["train_images"] = len(names)
        record["train_names_sha1"] = hashlib.sha1("\n".join(names).encode()).hexdigest()
    elif hasattr(loader, "num_rows"):                                              # FFCV
        record["train_images"] = int(loader.num_rows)
    return record


class _Checkpoints:
    """The run's checkpoints: what they record (every shape-deciding key and every tensor's shape,
    so a foreign checkpoint is refused naming what differs; the config and the resume record, so a
    resume that would change the steps is refused), restore, and save on every rank."""

    def __init__(self, path: Path, cfg, info, method, optimizer, scaler, ahead, probe=None, record=None):
        self.path, self.cfg, self.info, self.record = path, cfg, info, record or {}
        self.method, self.optimizer, self.scaler, self.ahead, self.probe = method, optimizer, scaler, ahead, probe
        self.meta = {"arch": cfg.arch, "method": cfg.method, "width": cfg.width,
                     "small_stem": use_small_stem(cfg.stem, cfg.size),
                     **{k: getattr(cfg, k) for k in shape_keys(method)}}
        self.shapes = {k: tuple(v.shape) for k, v in method.state_dict().items() if isinstance(v, torch.Tensor)}
        self.unreadable: dict[Path, str] = {}       # files restore skipped: the next save takes their place

    def restore(self) -> tuple[int, int, int]:
        """-> (step, epoch, batch in epoch) of the newest readable checkpoint, its state loaded."""
        state, path, self.unreadable = ckpt_io.load_latest(self.path, self.cfg.keep_checkpoints)
        ckpt_io.check_compatible(state, path, self.meta, self.shapes)
        ckpt_io.check_resumable(state, path, resume_changes(state.get("config") or {}, self.cfg), self.record)
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.ahead.load_state_dict(state["augment"][self.info.rank])
        if self.probe is not None and state.get("probe") is not None:
            self.probe.load_state_dict(state["probe"])
        torch.set_rng_state(state["rng_cpu"][self.info.rank])
        if self.info.is_main:
            for why in self.unreadable.values():
                print(f"train.py: {why}; resuming from the previous checkpoint {path}", flush=True)
            print(f"resumed {path} at step {state['step']} (epoch {state['epoch']}, batch "
                  f"{state['batch_in_epoch']})", flush=True)
        return state["step"], state["epoch"], state["batch_in_epoch"]

    def save(self, step: int, epoch: int, batch_in_epoch: int) -> None:
        aug_states = dist.all_gather_object(self.ahead.state_dict())
        rng_states = dist.all_gather_object(torch.get_rng_state())
        failed = None
        if self.info.is_main:
            try:
                ckpt_io.save_rotating({
                    "meta": self.meta, "config": to_dict(self.cfg), "resume_record": self.record,
                    "step": step, "epoch": epoch,
                    "batch_in_epoch": batch_in_epoch, "model": self.method.state_dict(),
                    "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                    "augment": aug_states, "rng_cpu": rng_states,
                    "probe": self.probe.state_dict() if self.probe is not None else None,
                    "backbone": {k: v.detach().cpu() for k, v in self.method.backbone.state_dict().items()},
                }, self.path, self.cfg.keep_checkpoints, unreadable=self.unreadable)
                self.unreadable = {}                # written over by this save
            except ckpt_io.CheckpointError as err:
                failed = err
        if dist.any_rank(failed is not None):       # every rank stops together
            raise RunStopped(str(failed or "rank 0 could not write the checkpoint"))
        dist.barrier()


class _StopOnSignal:
    """SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C) set `.name`; the loop checkpoints at the
    next step boundary and exits. A second Ctrl-C kills at once. The old handlers come back at exit."""

    def __init__(self):
        self.name, self.previous = None, {}

    def _request(self, signum, _frame):
        self.name = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def __enter__(self) -> "_StopOnSignal":
        self.previous = {s: signal.signal(s, self._request) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def _online_probe(cfg, method, loader, device):
    """A linear classifier on the detached pooled features of the last ResNet stage, trained by its
    own SGD step each step (eval/probe.py): top-1 in the logs, a live signal at almost no cost.
    Outside the method and the optimizer: the pretraining numbers do not change with it."""
    if not cfg.online_probe or not has_labels(loader.classes):   # unlabelled: said once at start-up
        return None
    from eval.probe import OnlineProbe
    probe = OnlineProbe(method.backbone.num_features, len(loader.classes)).to(device)
    probe.attach(method.backbone.layer4)            # MIM encoders run the stages, not backbone.forward
    return probe


@contextlib.contextmanager
def _log_closed(log):
    try:
        yield log
    finally:
        log.close()


def _final_eval(cfg, info, backbone, run: _RunDir, log, step: int, epoch: int, labelled: bool) -> float | None:
    """The exported backbone (torchvision state dict), its kNN accuracy where the data have labels
    (None otherwise), the curves: backbone.pt and curves.png are written either way."""
    if info.is_main:
        weights = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
        _write(run.dir / "backbone.pt", lambda: ckpt_io.save_atomic(weights, run.dir / "backbone.pt"))
    top1 = None
    if labelled:
        top1 = _knn(cfg, info, backbone)
        log.knn(step, epoch, top1)
    if info.is_main:
        _plot(run.metrics, run.dir / "curves.png")
    return top1


class _Interval:
    """What a log interval accumulates: the loss sum on the device (no sync), steps, data wait."""

    def __init__(self, device: torch.device):
        self.loss, self.steps, self.data, self.t = torch.zeros((), device=device), 0, 0.0, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss += loss
        self.steps += 1

    def reduce(self) -> "_Interval":
        self.loss = dist.all_reduce_mean(self.loss)   # each rank's loss is its share: average
        return self


def _reduce_logs(logs: dict) -> dict:
    """Global values of a method's logs: averaged over ranks, except z_std (a per-rank monitor)."""
    return {k: v if k == "z_std" else dist.all_reduce_mean(v.float()) for k, v in logs.items()}


def _check_eval_data(cfg):
    """Before hours of training: the final evaluation's data exist and the train and val class
    lists agree (eval/data.py). An unlabelled train split (a flat folder of photos, one class) ->
    cfg without the online probe and the kNN monitor, said once; section 9 skips the final kNN."""
    if cfg.loader == "synthetic" or not (cfg.final_eval or cfg.knn_every or cfg.online_probe):
        return cfg
    from eval.data import check_eval_data, unlabelled_note
    if check_eval_data(cfg):
        return cfg
    if dist.rank() == 0:
        print(f"train.py: {unlabelled_note(cfg)}", flush=True)
    return dataclasses.replace(cfg, online_probe=False, knn_every=0)


def _knn(cfg, info, backbone) -> float:
    from eval.knn import knn_accuracy_from_config
    return knn_accuracy_from_config(cfg, info, backbone)


def _write(path: Path, fn) -> None:
    """Run a read-modify-write of a run file; a disk or I/O error stops the run naming the path (the
    checkpoint is kept)."""
    try:
        fn()
    except OSError as err:
        raise RunStopped(f"could not write {path}: {err}; the checkpoint is kept") from err


def _truncate_metrics(path: Path, step: int) -> None:
    def truncate():
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
            atomic_write_text(path, "".join(line + "\n" for line in keep))
    _write(path, truncate)


class _Logger:
    """Rank 0: a tqdm bar per epoch, and one JSON line per log interval in metrics.jsonl."""

    def __init__(self, path: Path, enabled: bool, progress: bool):
        self.path, self.enabled, self.progress, self.bar = path, enabled, progress and enabled, None
        self.bad_logged = 0
        self.file = None
        if enabled:
            _write(path, lambda: setattr(self, "file", open(path, "a")))

    def start_epoch(self, epoch: int, steps: int, start: int) -> None:
        if self.progress:
            from tqdm import tqdm
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch}", dynamic_ncols=True, leave=True)

    def _record(self, record: dict) -> None:
        def write():
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        _write(self.path, write)

    def step(self, step, epoch, lr, since: _Interval, logs, batch_size, bad_total, bad_images) -> None:
        elapsed = time.perf_counter() - since.t
        record = {"step": step, "epoch": epoch, "lr": lr,
                  "loss": (since.loss / max(1, since.steps)).item(),
                  "images_per_s": batch_size * since.steps / max(elapsed, 1e-9),
                  "data_wait": since.data / max(elapsed, 1e-9), "nonfinite_total": bad_total}
        record.update({k: float(v) for k, v in logs.items() if k != "loss"})
        if len(bad_images) > self.bad_logged:       # images replaced since the last line (this rank's)
            record["bad_images"] = bad_images[self.bad_logged:]
            self.bad_logged = len(bad_images)
        if self.enabled:
            self._record(record)
            if self.bar is not None:
                self.bar.n = self.bar.n + since.steps
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.3g}",
                                     img_s=f"{record['images_per_s']:.0f}", wait=f"{record['data_wait']:.0%}")
                self.bar.refresh()
            elif not self.progress:
                print(json.dumps(record), flush=True)

    def knn(self, step, epoch, top1) -> None:
        if self.enabled:
            self._record({"step": step, "epoch": epoch, "knn_top1": top1})
            print(f"epoch {epoch}: kNN top-1 {top1:.2%}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file:
            self.file.close()


# curves.png: one panel per entry of PLOTS, every panel by step: (title, ((metrics key, label), ...)).
# kNN top-1 shares the online probe's panel (top-1 on the same classes), as points at its step.
PLOTS = (("pretraining loss", (("loss", "loss"),)),
         ("top-1", (("probe_top1", "online probe"), ("knn_top1", "kNN"))),
         ("learning rate", (("lr", "lr"),)),
         ("images/s", (("images_per_s", "images/s"),)))


def _curves(rows: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """metrics.jsonl rows -> {panel title: {label: [(step, value)]}}, the series that have points."""
    return {title: {label: pts for key, label in series if (pts := [(r["step"], r[key]) for r in rows if key in r])}
            for title, series in PLOTS}


def _plot(metrics_path: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    curves = _curves([json.loads(line) for line in metrics_path.read_text().splitlines() if line])
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (title, series) in zip(axes.flat, curves.items()):
        for label, points in series.items():
            ax.plot(*zip(*points), label=label, **({"marker": "o", "linestyle": "none"} if label == "kNN" else {}))
        if len(series) > 1:
            ax.legend()
        ax.set(xlabel="step", title=title)
    fig.tight_layout()
    _write(out, lambda: atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100)))
    plt.close(fig)


if __name__ == "__main__":
    exit_on_user_error("train.py", main)
