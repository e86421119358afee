"""masksiam training: self-supervised pretraining of a ResNet, one script, read top to bottom.

    python train.py --config configs/demo_fmnist.yaml [key=value ...]          # one process
    torchrun --nproc_per_node=8 train.py --config configs/simclr_in1k.yaml     # DDP (nccl; gloo on CPU)

Sections: 1 config and run directory; 2 performance settings; 3 data and augmentation; 4 model;
5 optimizer; 6 resume; 7 signals; 8 the loop; 9 the end (checkpoint, kNN, plot).

A step: the loader hands V uint8 crops per image (channels-last, on the device); the augment stage
turns them into float views (and masks / a mixed view); the online network embeds every view in one
batch; the method's loss compares them; a non-finite loss skips the update on the device (no sync).
The only host syncs are at log intervals, checkpoints and evaluation.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import masksiam  # noqa: F401  (torchvision importable on CPU torch)
from masksiam import checkpoint as ckpt_io
from masksiam import dist
from masksiam.config import ConfigError, load_config, save_config, to_dict
from masksiam.optim import build_optimizer, lr_at, peak_lr, set_lr
from masksiam.runinfo import write_run_info
from losses import Embeddings, get_method, hparams
from models.ema import ema_update, make_target, momentum_at
from models.heads import SiameseNet, build_heads
from models.resnet import build_backbone_from_config, use_small_stem
from models.syncbn import convert_sync_batchnorm
from pipelines.loaders import build_loader
from pipelines.augment.engine import build_augmenter


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="yaml recipe (configs/); keys as in masksiam/config.py")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lr=0.5 epochs=10")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    # ---- 1. config and run directory -----------------------------------------------------------
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        sys.exit(f"train.py: {err}")
    info = dist.init_distributed()
    method = get_method(cfg.method)
    hp = hparams(method, cfg)                       # the method's hyper-parameters, defaults filled in
    cfg = dataclasses.replace(cfg, **{k: v for k, v in hp.items() if hasattr(cfg, k)})
    run_dir = Path(cfg.out_dir) / (cfg.run_name or f"{cfg.method}-{cfg.arch}")
    ckpt_path = run_dir / "checkpoint.pt"
    elastic_restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    resume = (cfg.resume or elastic_restart) and ckpt_path.exists()
    if ckpt_path.exists() and not resume:
        sys.exit(f"train.py: {run_dir} already holds a checkpoint; pass resume=true to continue it, "
                 f"or choose another run_name / out_dir")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        write_run_info(run_dir, {"world_size": info.world_size, "resumed": bool(resume)})
    dist.barrier()

    # ---- 2. performance settings (all in one place) --------------------------------------------
    torch.manual_seed(cfg.seed)                     # same initial weights on every rank
    cuda = info.device.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # bf16 autocast on CUDA; on CPUs without native bf16 (AVX2) it is emulated and slower than fp32
    precision = ("bf16" if cuda else "fp32") if cfg.precision == "auto" else cfg.precision
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    autocast = torch.autocast(info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    # the augment stage writes bf16 on GPU (half the bandwidth into the first conv); fp32 on CPU
    aug_dtype = torch.bfloat16 if precision == "bf16" and cuda else torch.float32

    # ---- 3. data and augmentation --------------------------------------------------------------
    loader = build_loader(cfg, info)
    augment = build_augmenter(cfg.recipe, size=cfg.size, device=info.device, dtype=aug_dtype,
                              seed=cfg.seed, rank=info.rank, mix=cfg.mix)
    if augment.sources != cfg.views:
        sys.exit(f"train.py: recipe {cfg.recipe!r} takes {augment.sources} crops per image but views={cfg.views}")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        sys.exit(f"train.py: {cfg.data}/{cfg.train_split} has fewer images than one global batch "
                 f"({cfg.batch_size}); lower batch_size or set drop_last=false")
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = int(cfg.warmup_epochs * steps_per_epoch)

    # ---- 4. model ------------------------------------------------------------------------------
    backbone = build_backbone_from_config(cfg)
    projector, predictor = build_heads(backbone.num_features, hp)
    net = SiameseNet(backbone, projector, predictor)
    if cfg.sync_bn and info.world_size > 1:        # BN statistics over the global batch
        net = convert_sync_batchnorm(net, info.device)
    net = net.to(info.device, memory_format=memory_format)
    # EMA target: a momentum copy of backbone + projector (BYOL / MoCo never run a target predictor)
    target = SiameseNet(make_target(net.backbone), make_target(net.projector)) if method.target == "ema" else None
    queue = method.make_queue(hp, info.device) if method.queue else None   # MoCo negatives
    model = DDP(net, device_ids=[info.local_rank] if cuda else None) if info.world_size > 1 else net
    if cfg.compile:
        model = torch.compile(model)

    # ---- 5. optimizer --------------------------------------------------------------------------
    lr_peak = peak_lr(cfg.lr, cfg.batch_size, cfg.lr_scaling)
    optimizer = build_optimizer(net, cfg, lr_peak)

    # ---- 6. resume -----------------------------------------------------------------------------
    step, epoch, start_batch = 0, 0, 0
    meta = {"arch": cfg.arch, "method": cfg.method, "small_stem": use_small_stem(cfg.stem, cfg.size),
            "proj_dim": hp["proj_dim"]}
    if resume:
        state = ckpt_io.load(ckpt_path, map_location=info.device)
        ckpt_io.check_compatible(state, ckpt_path, **meta)
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        if target is not None:
            target.load_state_dict(state["target"])
        if queue is not None:
            queue.load_state_dict(state["queue"])
        augment.load_state_dict(state["augment"][info.rank])
        torch.set_rng_state(state["rng_cpu"][info.rank].cpu())
        step, epoch, start_batch = state["step"], state["epoch"], state["batch_in_epoch"]
        if info.is_main:
            print(f"resumed {ckpt_path} at step {step} (epoch {epoch}, batch {start_batch})", flush=True)
    metrics_path = run_dir / "metrics.jsonl"
    if info.is_main:
        _truncate_metrics(metrics_path, step)       # drop lines a killed run logged after its checkpoint

    def save_checkpoint(batch_in_epoch: int) -> None:
        aug_states = _all_gather_object(augment.state_dict())
        rng_states = _all_gather_object(torch.get_rng_state())
        if info.is_main:
            ckpt_io.save_atomic({
                "meta": meta, "config": to_dict(cfg), "step": step, "epoch": epoch,
                "batch_in_epoch": batch_in_epoch, "model": net.state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "target": target.state_dict() if target is not None else None,
                "queue": queue.state_dict() if queue is not None else None,
                "augment": aug_states, "rng_cpu": rng_states,
                "backbone": {k: v.detach().cpu() for k, v in net.backbone.state_dict().items()},
            }, ckpt_path)
        dist.barrier()

    # ---- 7. signals: SIGTERM / SIGINT write a checkpoint at the next step boundary and exit ----
    stop = {"signal": None}

    def request_stop(signum, _frame):
        stop["signal"] = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)       # a second Ctrl-C kills at once

    previous_handlers = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}

    # ---- 8. the loop ---------------------------------------------------------------------------
    log = _Logger(metrics_path, info.is_main, cfg.progress)
    bad_in_row = torch.zeros((), device=info.device)   # consecutive non-finite losses, on the device
    bad_total = torch.zeros((), device=info.device)
    since_log = {"loss": torch.zeros((), device=info.device), "steps": 0, "data": 0.0, "t": time.perf_counter()}
    logs = {}
    exit_reason = "finished"
    while epoch < cfg.epochs and exit_reason == "finished":
        loader.set_epoch(epoch, start_batch)
        log.start_epoch(epoch, steps_per_epoch, start_batch)
        batch_in_epoch = start_batch
        t_wait = time.perf_counter()
        for batch in loader:
            since_log["data"] += time.perf_counter() - t_wait
            lr = lr_at(step, total_steps, warmup_steps, lr_peak, cfg.min_lr_ratio)
            set_lr(optimizer, lr)

            out = augment(batch.views)              # float views (N,3,H,W) channels-last, masks, mix
            online_views, target_views = method.views(out.pairs, **hp)
            mixing = out.mixed is not None
            with autocast:
                # every online input (and the mixed view) in one forward: one DDP forward per backward
                z, p, z_m, p_m = _embed(model, out.views, online_views, out.mixed)
                zt = None
                if target is not None:
                    with torch.no_grad():
                        zt, _, _, _ = _embed(target, out.views, target_views)
                emb = Embeddings(z=z, p=p, zt=zt, pairs=out.pairs, queue=queue.tensor if queue else None)
                loss, logs = method.loss(emb, **hp)
                if mixing:                          # MixMask / Un-Mix: the mixed view's extra term
                    loss_mix, mix_logs = method.mixed_loss(emb, z_m, p_m, out.mix_lam, out.mix_source, hp)
                    loss = loss + cfg.mix_weight * loss_mix
                    logs.update(mix_logs)

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            nonfinite = ~torch.isfinite(loss.detach())
            if info.world_size > 1:                 # every rank skips together (async collective, no sync)
                nonfinite = dist.all_reduce_max(nonfinite)
            if cfg.grad_clip > 0:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip, foreach=True)
                nonfinite |= ~torch.isfinite(grad_norm)
                logs["grad_norm"] = grad_norm.detach()
            if scaler.is_enabled():
                scaler.step(optimizer)              # the scaler skips inf/nan gradients itself
            else:
                optimizer.found_inf, optimizer.grad_scale = nonfinite.float(), None
                optimizer.step()
                del optimizer.found_inf, optimizer.grad_scale
            scaler.update()
            if target is not None:                  # EMA target follows the online net
                m = momentum_at(step, total_steps, hp["ema_momentum"], hp["ema_schedule"])
                ema_update(target.backbone, net.backbone, m)
                ema_update(target.projector, net.projector, m)
            if queue is not None:                   # MoCo: this step's keys from every rank
                queue.push(zt, out.pairs)
            bad_in_row = (bad_in_row + 1) * nonfinite
            bad_total += nonfinite
            since_log["loss"] += torch.where(nonfinite, 0.0, loss.detach().float())
            since_log["steps"] += 1
            step += 1
            batch_in_epoch += 1

            last_of_epoch = batch_in_epoch == steps_per_epoch
            # ranks must agree on entering this block (collectives inside): a signal cuts the log
            # interval short only in a single process
            if step % cfg.log_every == 0 or last_of_epoch or (stop["signal"] and info.world_size == 1):
                n_bad = int(bad_in_row.item())      # the sync happens here, at log intervals only
                # global values: each rank's loss is its share (losses/__init__.py), so average;
                # z_std is a per-rank collapse monitor and stays local
                since_log["loss"] = dist.all_reduce_mean(since_log["loss"])
                logs = {k: v if k == "z_std" else dist.all_reduce_mean(v.float()) for k, v in logs.items()}
                log.step(step, epoch, lr, since_log, logs, cfg.batch_size, int(bad_total.item()))
                since_log = {"loss": torch.zeros((), device=info.device), "steps": 0, "data": 0.0,
                             "t": time.perf_counter()}
                if n_bad >= cfg.max_bad_steps:
                    exit_reason = (f"stopped: {n_bad} non-finite losses in a row up to step {step}; "
                                   f"the last good checkpoint {ckpt_path} is kept")
                    break
                if _any_rank(stop["signal"] is not None, info.device):
                    save_checkpoint(batch_in_epoch if not last_of_epoch else 0)
                    if last_of_epoch:
                        epoch += 1
                    exit_reason = f"stopped by {stop['signal'] or 'a signal on another rank'}; checkpoint written at step {step}"
                    break
            if cfg.max_steps and step >= cfg.max_steps:
                exit_reason = f"reached max_steps={cfg.max_steps}"
                break
            t_wait = time.perf_counter()

        if exit_reason.startswith("stopped"):
            break
        if batch_in_epoch == steps_per_epoch:
            epoch, start_batch = epoch + 1, 0
            if cfg.knn_every and epoch % cfg.knn_every == 0 and epoch < cfg.epochs:
                log.knn(step, epoch, _knn(cfg, info, net.backbone))
            if cfg.ckpt_every and (epoch % cfg.ckpt_every == 0 or epoch == cfg.epochs):
                save_checkpoint(0)
        else:                                       # max_steps inside an epoch
            if cfg.ckpt_every:
                save_checkpoint(batch_in_epoch)
            start_batch = batch_in_epoch

    # ---- 9. the end: kNN of the final backbone, exported weights, plot -------------------------
    result = {"run_dir": str(run_dir), "step": step, "epoch": epoch, "exit": exit_reason}
    if cfg.final_eval and (exit_reason == "finished" or exit_reason.startswith("reached")):
        if info.is_main:
            ckpt_io.save_atomic({k: v.detach().cpu() for k, v in net.backbone.state_dict().items()},
                                run_dir / "backbone.pt")
        result["knn_top1"] = _knn(cfg, info, net.backbone)
        log.knn(step, epoch, result["knn_top1"])
        if info.is_main:
            _plot(metrics_path, run_dir / "curves.png")
    log.close()
    for signum, handler in previous_handlers.items():
        signal.signal(signum, handler)
    if info.is_main:
        print(json.dumps(result), flush=True)
        with open(run_dir / "result.json", "w") as f:
            json.dump(result, f, indent=2)
    dist.cleanup()
    if exit_reason.startswith("stopped: "):
        sys.exit(f"train.py: {exit_reason}")
    return result


# ---- helpers (used once each above; kept here so the loop reads top to bottom) ------------------

def _embed(net, views: list[torch.Tensor], which: list[int], mixed: torch.Tensor | None = None):
    """views[i] for i in `which` (and the mixed view) through `net` as one batch.

    Returns z, p as lists over all views (None where a view was not embedded) and the mixed view's
    z_m, p_m. One batch means one forward: BatchNorm sees every view, and DDP one forward per step.
    """
    inputs = [views[i] for i in which] + ([mixed] if mixed is not None else [])
    _, z_all, p_all = net(torch.cat(inputs))
    z_parts = z_all.chunk(len(inputs))
    p_parts = p_all.chunk(len(inputs)) if p_all is not None else [None] * len(inputs)
    z, p = [None] * len(views), [None] * len(views)
    for k, i in enumerate(which):
        z[i], p[i] = z_parts[k], p_parts[k]
    if mixed is not None:
        return z, (p if p_all is not None else None), z_parts[-1], p_parts[-1]
    return z, (p if p_all is not None else None), None, None


def _any_rank(flag: bool, device: torch.device) -> bool:
    if dist.world_size() == 1:
        return flag
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def _all_gather_object(obj) -> list:
    if dist.world_size() == 1:
        return [obj]
    out = [None] * dist.world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def _knn(cfg, info, backbone) -> float:
    from eval.knn import knn_accuracy_from_config
    return knn_accuracy_from_config(cfg, info, backbone)


def _truncate_metrics(path: Path, step: int) -> None:
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


class _Logger:
    """Rank 0: a tqdm bar per epoch, and one JSON line per log interval in metrics.jsonl."""

    def __init__(self, path: Path, enabled: bool, progress: bool):
        self.enabled, self.progress, self.bar = enabled, progress and enabled, None
        self.file = open(path, "a") if enabled else None

    def start_epoch(self, epoch: int, steps: int, start: int) -> None:
        if self.progress:
            from tqdm import tqdm
            if self.bar is not None:
                self.bar.close()
            self.bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch}", dynamic_ncols=True, leave=True)

    def step(self, step, epoch, lr, since, logs, batch_size, bad_total) -> None:
        elapsed = time.perf_counter() - since["t"]
        record = {"step": step, "epoch": epoch, "lr": lr,
                  "loss": (since["loss"] / max(1, since["steps"])).item(),
                  "images_per_s": batch_size * since["steps"] / max(elapsed, 1e-9),
                  "data_wait": since["data"] / max(elapsed, 1e-9), "nonfinite_total": bad_total}
        record.update({k: float(v) for k, v in logs.items() if k != "loss"})
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.bar is not None:
                self.bar.n = self.bar.n + since["steps"]
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.3g}",
                                     img_s=f"{record['images_per_s']:.0f}", wait=f"{record['data_wait']:.0%}")
                self.bar.refresh()
            elif not self.progress:
                print(json.dumps(record), flush=True)

    def knn(self, step, epoch, top1) -> None:
        if self.enabled:
            self.file.write(json.dumps({"step": step, "epoch": epoch, "knn_top1": top1}) + "\n")
            self.file.flush()
            print(f"epoch {epoch}: kNN top-1 {top1:.2%}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file:
            self.file.close()


def _plot(metrics_path: Path, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line]
    steps = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    knn = [(r["epoch"], r["knn_top1"]) for r in rows if "knn_top1" in r]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if steps:
        axes[0].plot(*zip(*steps))
    axes[0].set(xlabel="step", ylabel="loss", title="pretraining loss")
    if knn:
        axes[1].plot(*zip(*knn), marker="o")
    axes[1].set(xlabel="epoch", ylabel="kNN top-1", title="kNN monitor")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
