"""masksiam training: self-supervised pretraining of a ResNet, one script, read top to bottom.

    python train.py --config configs/demo_fmnist.yaml [key=value ...]          # one process
    torchrun --nproc_per_node=8 train.py --config configs/simclr_rn50_in1k.yaml     # DDP (nccl; gloo on CPU)

Sections of `main`: 1 config and run directory; 2 performance settings; 3 data and augmentation;
4 the method (network, heads, state); 5 optimizer; 6 resume; 7 the run record; 8 the loop (signals:
a checkpoint at the step boundary); 9 the end (backbone.pt, kNN, curves.png, result.json). The run
directory, checkpoints, logging and signals are masksiam/ modules (rundir, run_checkpoint,
metrics_log, signals).

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
import dataclasses
import enum
import json
import time
from types import SimpleNamespace
from typing import NamedTuple

import torch

import masksiam  # noqa: F401  (torchvision importable on CPU torch)
from masksiam import dist, metrics_log, run_checkpoint
from masksiam.config import ConfigError, load_config
from masksiam.errors import ArgumentParser, exit_on_user_error
from masksiam.io import atomic_write_text
from masksiam.metrics_log import Interval, Logger, reduce_logs
from masksiam.optim import build_optimizer, lr_at, peak_lr, set_lr
from masksiam.rundir import RunDir, RunStopped, write_or_stop
from masksiam.run_checkpoint import RunCheckpoints
from masksiam.signals import StopOnSignal
from losses import build_method, get_method, hparams
from models.resnet import build_backbone_from_config
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
    # the method's settings, defaults filled in, under their one key: config.yaml records what ran
    cfg = dataclasses.replace(cfg, method_args=hparams(get_method(cfg.method), cfg))
    run = RunDir.of(cfg)                            # resume, or refuse a run directory that has a checkpoint
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
    # sync_bn: GlobalBatchNorm keeps every rank's BN buffers equal, nothing to broadcast per forward
    model = dist.wrap_ddp(method, info.device, broadcast_buffers=not cfg.sync_bn)
    probe = _online_probe(cfg, method, loader, info.device)

    # ---- 5. optimizer --------------------------------------------------------------------------
    lr_peak = peak_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    optimizer = build_optimizer(method, cfg, lr_peak)

    # ---- 6. resume: everything a step depends on, checked against this run first -----------------
    ckpt = RunCheckpoints(run.ckpt_path, cfg, info, method, optimizer, perf.scaler, ahead, probe,
                          record=run_checkpoint.resume_record(loader, info))
    step, epoch, start_batch = ckpt.restore() if run.resume else (0, 0, 0)

    # ---- 7. the run record: written only now, after every check --------------------------------
    run.record(cfg, info, step)

    # ---- 8. the loop (SIGTERM / SIGINT: a checkpoint at the next step boundary, then exit) -------
    log = Logger(run.metrics, info.is_main, cfg.progress)
    bad_in_row = torch.zeros((), device=info.device)   # consecutive non-finite losses, on the device
    bad_total = torch.zeros((), device=info.device)
    since_log = Interval(info.device)
    exit, detail = Exit.FINISHED, "finished"
    if cfg.max_steps and step >= cfg.max_steps:     # a resumed run that already got there trains none
        exit, detail = Exit.MAX_STEPS, f"reached max_steps={cfg.max_steps}"
    with log, StopOnSignal() as stop:
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
                    log.step(step, epoch, lr, since_log.reduce(), reduce_logs(logs), cfg.batch_size,
                             int(bad_total.item()), loader.bad_images)
                    since_log = Interval(info.device)
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

        # ---- 9. the end: exported backbone, kNN of it (final_eval, labelled data), plot ---------
        result = {"run_dir": str(run.dir), "step": step, "epoch": epoch, "exit": detail,
                  "bad_images": sorted({b for bad in dist.all_gather_object(loader.bad_images) for b in bad})}
        if exit in (Exit.FINISHED, Exit.MAX_STEPS):  # backbone.pt and curves.png with or without a kNN
            ckpt.export_backbone(run.dir / "backbone.pt")
            if cfg.final_eval and has_labels(loader.classes):
                result["knn_top1"] = _knn(cfg, info, method.backbone)
                log.knn(step, epoch, result["knn_top1"])
            if info.is_main:
                metrics_log.plot(run.metrics, run.dir / "curves.png")
        if info.is_main:
            for bad in result["bad_images"]:
                print(f"train.py: skipped an unreadable image (bad_images=skip): {bad}", flush=True)
            print(json.dumps(result), flush=True)
            write_or_stop(run.dir / "result.json", lambda: atomic_write_text(run.dir / "result.json",
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
    return _Perf(autocast=torch.autocast(info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None),
                 scaler=torch.amp.GradScaler(info.device.type, enabled=precision == "fp16"),
                 memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format,
                 # the augment stage writes bf16 on GPU (half the bandwidth into the first conv)
                 aug_dtype=torch.bfloat16 if precision == "bf16" and cuda else torch.float32)


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


if __name__ == "__main__":
    exit_on_user_error("train.py", main)
