"""The training step reads nothing back to the host: on a GPU each .item(), nonzero, boolean-mask index
or bincount is a stall of the whole pipeline. On the CPU the step runs under a dispatch mode that
fails on every such op (tests/test_augment_engine.py's detector); on CUDA under
torch.cuda.set_sync_debug_mode("error")."""
from __future__ import annotations


import pytest
import torch

import masksiam  # noqa: F401
import train
from losses import METHODS, build_method
from masksiam.config import Config
from masksiam.optim import build_optimizer
from models.resnet import build_backbone_from_config
from pipelines.augment.engine import build_augmenter

from test_augment_engine import NoHostSync, one_thread
from test_failures import RECIPE

CASES = [(m, RECIPE.get(m, "simclr")) for m in sorted(METHODS)] + [("moco", "mixmask"), ("byol", "mscn_byol"),
                                                                     ("barlow", "unmix")]


def _setup(method: str, recipe: str, device: str = "cpu", optimizer: str = "lars"):
    cls = METHODS[method]
    small = {"proj_hidden": 32, "proj_dim": 16, "queue_size": 16,
             **({"pred_hidden": 32} if getattr(cls, "predictor", False) else {})}
    cfg = Config(method=method, recipe=recipe, arch="resnet10", width=8, stem="small", size=32,
                 method_args=small, optimizer=optimizer, batch_size=6,
                 views=2 if method not in RECIPE else 1, grad_clip=1.0)
    with one_thread():                                    # chunks inline, as on a GPU
        aug = build_augmenter(recipe, 32, device=device, seed=0, chunk=3)
    torch.manual_seed(0)
    net = build_method(cfg, build_backbone_from_config(cfg), mixes=aug.recipe.mix is not None).to(
        device, memory_format=torch.channels_last)
    opt = build_optimizer(net, cfg, 0.1)
    g = torch.Generator().manual_seed(1)
    views = [torch.randint(0, 256, (6, 3, 32, 32), generator=g, dtype=torch.uint8).to(device)
             .contiguous(memory_format=torch.channels_last) for _ in range(aug.sources)]
    return cfg, aug, net, opt, views


@pytest.mark.parametrize("method, recipe", CASES)
def test_the_step_reads_nothing_back(method, recipe):
    cfg, aug, net, opt, views = _setup(method, recipe)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    autocast = torch.autocast("cpu", enabled=False)
    out = aug(views)
    probe = train._online_probe(cfg, net, type("L", (), {"classes": ["a", "b", "c"]}), "cpu")
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with NoHostSync():
        for step in range(2):                              # the second step: optimizer state exists
            loss, logs, nonfinite = train.train_step(net, opt, scaler, autocast, out, cfg.grad_clip, probe, labels)
            net.after_step(step, 10)
    assert "probe_top1" in logs                            # the online probe's step is in the path too
    assert torch.isfinite(loss) and not nonfinite
    assert all(v.dim() == 0 for v in logs.values())       # scalar tensors, read at log intervals only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method, recipe", CASES)
def test_the_step_reads_nothing_back_on_cuda(method, recipe):
    cfg, aug, net, opt, views = _setup(method, recipe, device="cuda", optimizer="lars")
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16)
    train.train_step(net, opt, scaler, autocast, aug(views), cfg.grad_clip)   # warm-up: lazy inits
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(2):
            out = aug(views)
            train.train_step(net, opt, scaler, autocast, out, cfg.grad_clip)
            net.after_step(step, 10)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_the_detector_sees_a_sync_in_a_method(monkeypatch):
    """The test above can fail: a method that reads its loss back is caught."""
    cfg, aug, net, opt, views = _setup("simclr", "simclr")
    loss_fn = type(net).loss

    def reads_back(emb, **hp):
        loss, logs = loss_fn(emb, **hp)
        if loss.item() > 1e9:                              # a host read, as a careless method would do
            pass
        return loss, logs

    monkeypatch.setattr(type(net), "loss", staticmethod(reads_back))
    out = aug(views)
    with pytest.raises(AssertionError, match="host sync"), NoHostSync():
        train.train_step(net, opt, torch.amp.GradScaler("cpu", enabled=False), torch.autocast("cpu", enabled=False),
                         out, 0.0)
