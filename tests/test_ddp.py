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
from masksiam.syncs import HostRead, no_host_reads, sync_free
from models.heads import SiameseNet, build_heads
from models.resnet import build_backbone
from models.syncbn import GlobalBatchNorm, convert_sync_batchnorm, global_batch_norm

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
    model = convert_sync_batchnorm(_net())
    model = torch.nn.parallel.DistributedDataParallel(model)
    half = N_GLOBAL // 2
    views = [v[rank * half:(rank + 1) * half] for v in _batch()]
    loss, grads = _step_grads(model, views)
    torch.save({"loss": loss, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    mdist.cleanup()                             # barrier first: see masksiam.dist.cleanup


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


def _bn_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A global batch (8, 5, 3, 3), channels-last, mean ~100 and std ~1-3 per channel (naive
    E[x^2] - E[x]^2 loses ~1e-3 of the variance in float32 here), and a loss weight like it."""
    g = torch.Generator().manual_seed(10 + step)
    x = 100 + torch.randn(N_GLOBAL, 5, 3, 3, generator=g) * torch.linspace(1, 3, 5).view(1, 5, 1, 1)
    return x.contiguous(memory_format=torch.channels_last), torch.randn(N_GLOBAL, 5, 3, 3, generator=g)


def _bn_steps(bn: torch.nn.Module, rank: int | None) -> dict[str, torch.Tensor]:
    """Two training steps of `bn` on the global batch (rank None) or on rank's half; per step the
    output and the input gradient of sum(y * w), the summed weight/bias gradients, running stats."""
    out = {}
    for step in range(2):
        x, w = _bn_data(step)
        if rank is not None:
            half = N_GLOBAL // 2
            x, w = x[rank * half:(rank + 1) * half], w[rank * half:(rank + 1) * half]
        x = x.clone().requires_grad_()
        y = bn(x)
        (y * w).sum().backward()
        out[f"y{step}"], out[f"dx{step}"] = y.detach(), x.grad
    out.update(dw=bn.weight.grad, db=bn.bias.grad, mean=bn.running_mean, var=bn.running_var)
    return out


def _bn_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    mdist.init_distributed()
    torch.set_num_threads(1)
    results = {}
    for momentum in (0.1, None):
        with no_host_reads():
            results[momentum] = _bn_steps(_seeded_bn(GlobalBatchNorm, momentum), rank)
    torch.save(results, os.path.join(out_dir, f"bn{rank}.pt"))
    mdist.cleanup()                             # barrier first: see masksiam.dist.cleanup


def test_global_batchnorm_at_world_size_2_is_batchnorm_of_the_concatenated_batch(tmp_path):
    """gloo, 2 ranks x 4: forward, input and parameter gradients, running stats (momentum 0.1 and
    the cumulative average) equal nn.BatchNorm2d over the 8; no host read inside (no_host_reads)."""
    spawn_and_join(_bn_worker, (_free_port(), str(tmp_path)), nprocs=2, timeout=120)
    ranks = [torch.load(tmp_path / f"bn{r}.pt") for r in range(2)]
    for momentum in (0.1, None):
        ref = _bn_steps(_seeded_bn(torch.nn.BatchNorm2d, momentum), None)
        for step in range(2):
            for key in (f"y{step}", f"dx{step}"):
                got = torch.cat([ranks[0][momentum][key], ranks[1][momentum][key]])
                torch.testing.assert_close(got, ref[key], rtol=1e-4, atol=1e-4, msg=f"{key}, momentum {momentum}")
        for key in ("dw", "db"):   # per-rank shares; DDP's average times 2 is their sum
            torch.testing.assert_close(ranks[0][momentum][key] + ranks[1][momentum][key], ref[key],
                                       rtol=1e-4, atol=1e-4)
        for r in range(2):
            for key in ("mean", "var"):
                torch.testing.assert_close(ranks[r][momentum][key], ref[key], rtol=1e-5, atol=1e-5)
        assert ref["var"].min() > 0.1


def _seeded_bn(cls, momentum) -> torch.nn.Module:
    """A BatchNorm of 5 channels with random affine parameters, the same in every process."""
    g = torch.Generator().manual_seed(0)
    bn = cls(5, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.uniform_(-1, 1, generator=g)
    return bn


def _check_global_batch_norm_function(device: torch.device) -> None:
    """The autograd function itself (the path every rank takes at world size > 1; CPU ops, or torch's
    SyncBatchNorm kernels on CUDA) against F.batch_norm, bf16 in with float32 statistics as under
    autocast, inside bench.sync_free (CPU: no host reads; CUDA: sync-debug "error")."""
    x, w = (t.to(device) for t in _bn_data(0))
    g = torch.Generator().manual_seed(3)
    weight, bias = (torch.rand(5, generator=g) + 0.5).to(device), torch.randn(5, generator=g).to(device)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):   # x ~ 100: ulp 8e-6
        xa = x.to(dtype).detach().clone().requires_grad_()
        xb = xa.detach().clone().requires_grad_()
        wa, ba = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        wb, bb = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        with sync_free(device):
            y, mean, var, counts = global_batch_norm(xa, wa, ba, 1e-5)
            (y.float() * w).sum().backward()
        ref = torch.nn.functional.batch_norm(xb.float(), None, None, wb, bb, training=True, eps=1e-5)
        (ref * w).sum().backward()
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(xa.grad.float(), xb.grad.float(), rtol=tol, atol=tol)
        torch.testing.assert_close(wa.grad, wb.grad, rtol=tol, atol=tol * 10)
        torch.testing.assert_close(ba.grad, bb.grad, rtol=tol, atol=tol * 10)
        torch.testing.assert_close(mean, xb.detach().float().mean((0, 2, 3)), rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(var, xb.detach().float().var((0, 2, 3), unbiased=False), rtol=1e-3, atol=1e-3)
        assert counts.tolist() == [N_GLOBAL * 9]


def test_global_batch_norm_function_at_world_size_1_is_batch_norm():
    _check_global_batch_norm_function(torch.device("cpu"))


def test_no_host_reads_catches_each_kind():
    x = torch.arange(4.0)
    for bad in (lambda: x.sum().item(), lambda: x.cpu(), lambda: x[x > 1], lambda: bool(x.sum()),
                lambda: torch.bincount(x.long()), lambda: float(x[0])):
        with no_host_reads(), pytest.raises(HostRead):
            bad()
    with no_host_reads():
        assert x[1:3].shape == (2,)


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
    conv = convert_sync_batchnorm(net)
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


def test_convert_sync_batchnorm_never_gives_torch_syncbatchnorm():
    """torch's nn.SyncBatchNorm reads counts on the host once per layer per forward: never used."""
    conv = convert_sync_batchnorm(_net())
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in conv.modules())
    assert isinstance(conv.backbone.bn1, GlobalBatchNorm)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_global_batch_norm_cuda_kernels_are_batch_norm_without_syncs():
    _check_global_batch_norm_function(torch.device("cuda"))
