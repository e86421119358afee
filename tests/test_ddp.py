"""DDP on CPU (gloo): two processes holding half a batch each take the step one process takes on
the whole batch. The network is the real one (ResNet + projector with BatchNorm, synchronised by
models.syncbn) and the loss is SimCLR with negatives gathered across ranks. Everything here tests the
CPU: MASKSIAM_DEVICE=cpu pins it for init_distributed, also on a CUDA host."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import masksiam  # noqa: F401
from losses import Embeddings, get_method, hparams
from masksiam import dist as mdist
from masksiam.config import Config, ConfigError
from models.heads import SiameseNet, build_heads
from models.resnet import build_backbone
from models.syncbn import GlobalBatchNorm, convert_sync_batchnorm

N_GLOBAL = 8


@pytest.fixture(autouse=True)
def _pin_cpu(monkeypatch):
    """CPU tests: init_distributed picks the CPU (and gloo) even where CUDA exists; spawned workers
    inherit the environment."""
    monkeypatch.setenv(mdist.DEVICE_ENV, "cpu")


def _net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    hp = {**hparams(get_method("simclr"), Config()), "proj_hidden": 32, "proj_dim": 16}
    backbone = build_backbone("resnet10", small_stem=True, zero_init_residual=False, width=8)
    projector, predictor = build_heads(backbone.num_features, hp)
    return SiameseNet(backbone, projector, predictor).to(memory_format=torch.channels_last)


def _batch():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(N_GLOBAL, 3, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
            for _ in range(2)]


def _step_grads(model, views) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimCLR loss of two views through the network in one batch; returns loss and gradients."""
    method = get_method("simclr")
    _, z, _ = model(torch.cat(views))
    za, zb = z.chunk(2)
    loss, _ = method.loss(Embeddings(z=[za, zb], pairs=[(0, 1)]), temperature=0.2)
    loss.backward()
    net = model.module if hasattr(model, "module") else model
    return loss.detach(), {k: p.grad.detach().clone() for k, p in net.named_parameters()}


def spawn_and_join(fn, args, nprocs: int, timeout: float) -> None:
    """mp.spawn that cannot hang the suite: join() returns when any process exits, so loop."""
    import time
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            raise AssertionError(f"{nprocs} gloo workers did not finish in {timeout} s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    info = mdist.init_distributed()             # the CPU and gloo: MASKSIAM_DEVICE=cpu (_pin_cpu)
    assert info.device.type == "cpu" and dist.get_backend() == "gloo" and info.rank == rank
    torch.set_num_threads(1)
    model = convert_sync_batchnorm(_net(), torch.device("cpu"))
    model = torch.nn.parallel.DistributedDataParallel(model)
    half = N_GLOBAL // 2
    views = [v[rank * half:(rank + 1) * half] for v in _batch()]
    loss, grads = _step_grads(model, views)
    torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_processes_take_the_single_process_step(tmp_path):
    ref_loss, ref_grads = _step_grads(_net(), _batch())
    spawn_and_join(_worker, (_free_port(), str(tmp_path)), nprocs=2, timeout=180)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    # each rank's loss is its share; their mean is the full-batch loss
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, ref_loss, rtol=1e-5, atol=1e-6)
    for name, ref in ref_grads.items():
        for r in range(2):   # DDP averaged: both ranks hold the full-batch gradient
            # float32 round-off (sums in another order, one-pass variance): ~5e-6 relative here
            rel = (ranks[r]["grads"][name] - ref).norm() / ref.norm().clamp_min(1e-12)
            assert rel < 1e-4, f"{name}: rank {r} gradient differs by {rel:.2e} (relative norm)"
    assert any(g.abs().sum() > 0 for g in ref_grads.values())


def test_global_batchnorm_is_plain_batchnorm_in_one_process():
    torch.manual_seed(0)
    bn, gbn = torch.nn.BatchNorm2d(5), GlobalBatchNorm(5)
    x = torch.randn(6, 5, 4, 4, requires_grad=True)
    y_ref, y = bn(x), gbn(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(gbn.running_var, bn.running_var)


def test_convert_sync_batchnorm_keeps_weights_and_keys():
    net = _net()
    with torch.no_grad():
        net.backbone.bn1.weight.uniform_()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    conv = convert_sync_batchnorm(net, torch.device("cpu"))
    assert isinstance(conv.backbone.bn1, GlobalBatchNorm)
    after = conv.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        torch.testing.assert_close(after[k], before[k])


def test_choose_device_argument_then_environment(monkeypatch):
    assert mdist.choose_device("cpu") == "cpu"
    assert mdist.choose_device() == "cpu"                      # MASKSIAM_DEVICE=cpu (_pin_cpu)
    monkeypatch.setenv(mdist.DEVICE_ENV, "auto")
    assert mdist.choose_device() == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv(mdist.DEVICE_ENV, "gpu")
    with pytest.raises(ConfigError, match="MASKSIAM_DEVICE='gpu': choose from auto, cpu, cuda"):
        mdist.choose_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="cuda but CUDA is not available"):
        mdist.choose_device("cuda")


def test_cuda_device_is_the_local_rank_modulo_the_visible_gpus(monkeypatch):
    """A scheduler showing each task one GPU: local rank 3 of 4 takes cuda:0, not set_device(3)."""
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")                     # no process group: only the device
    info = mdist.init_distributed("cuda")
    assert info.device == torch.device("cuda", 0) and chosen == [torch.device("cuda", 0)]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert mdist.init_distributed("cuda").device == torch.device("cuda", 1)
