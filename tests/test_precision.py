"""A loss's precision is the same in its forward and its backward (losses/common.py, full_precision).

The loop turns TF32 on (train.py); a pure loss turns it off for its forward, and its backward runs
later, in loss.backward(). The flag (torch.backends.cuda.matmul.allow_tf32) is a process-wide setting
that this CPU build reads and writes like a CUDA one, so the tests record it: at every matrix product
the backward runs (a dispatch mode) and in identity autograd Functions placed in the graph. What
must hold: every matmul of a loss's backward sees TF32 off, the network's before and after it TF32
on, and the flag is back on after the backward."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from losses import METHODS, Embeddings
from losses.common import full_precision

MATMULS_NAMES = {"mm", "addmm", "bmm", "baddbmm", "matmul", "dot", "mv"}


def tf32() -> bool:
    return torch.backends.cuda.matmul.allow_tf32


@pytest.fixture(autouse=True)
def tf32_on():
    """The loop's setting (train.py: allow_tf32 = True on CUDA), restored after each test."""
    before = tf32()
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


class Log(TorchDispatchMode):
    """(op name, TF32 flag) of every aten op (matrix products are the ones TF32 changes; every op
    shows which region it ran in), and marks added by `Mark`."""

    def __init__(self):
        super().__init__()
        self.entries: list[tuple[str, bool]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.entries.append((func.overloadpacket.__name__, tf32()))
        return func(*args, **(kwargs or {}))


class Mark(torch.autograd.Function):
    """Identity that logs the flag in its forward and backward: the boundary of a region."""
    @staticmethod
    def forward(ctx, x, log, name):
        ctx.log, ctx.name = log, name
        log.entries.append((f"{name}.forward", tf32()))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.log.entries.append((f"{ctx.name}.backward", tf32()))
        return g, None, None


def test_a_loss_backward_runs_without_tf32_and_the_network_with_it():
    log = Log()

    @full_precision
    def loss_fn(z: torch.Tensor) -> torch.Tensor:
        inner = Mark.apply(z, log, "loss")
        return (inner @ inner.T).square().mean()

    lin = torch.nn.Linear(8, 8)
    x = torch.randn(5, 8)
    with log:
        z = Mark.apply(lin(x), log, "net")
        loss = loss_fn(z)
        assert tf32()                                          # the forward's context ended
        n_forward = len(log.entries)
        loss.backward()
    assert tf32()                                              # restored after the backward
    flags = dict((k, v) for k, v in log.entries if "." in k)
    assert flags == {"net.forward": True, "loss.forward": False, "loss.backward": False, "net.backward": True}
    loss_part, net_part = _split_backward(log.entries[n_forward:])
    assert any(k == "mm" for k, _ in loss_part)               # the transposes of the loss's matmul
    assert any(k == "mm" for k, _ in net_part)                # the Linear's weight gradient


def _split_backward(entries: list[tuple[str, bool]]):
    """A backward's log -> (the loss's part, the network's part): the seed gradient (ones_like,
    before the loss's fence) with TF32 on, then one run of the loss's ops with it off, then the
    network's (every mark "net*" among them) with it on again."""
    first_off = min(i for i, (_, v) in enumerate(entries) if not v)
    last_off = max(i for i, (_, v) in enumerate(entries) if not v)
    assert first_off <= 2 and not any(k in MATMULS_NAMES for k, _ in entries[:first_off]), entries[:first_off]
    loss_part, net_part = entries[first_off:last_off + 1], entries[last_off + 1:]
    assert not any(v for _, v in loss_part), loss_part
    assert not any(k.startswith("net") for k, _ in loss_part), loss_part
    assert any(k.startswith("net") for k, _ in net_part), net_part
    return loss_part, net_part


def _embeddings(method: str, log: Log) -> tuple[Embeddings, dict, torch.nn.Linear]:
    torch.manual_seed(0)
    net = torch.nn.Linear(6, 6)
    x = torch.randn(2, 8, 6)
    z = [Mark.apply(net(x[i]), log, f"net{i}") for i in range(2)]
    m = METHODS[method]
    hp = dict(m.DEFAULTS)
    if m.ema:
        zt = [net(x[i]).detach() for i in range(2)]
        emb = Embeddings(z=z, p=z if getattr(m, "predictor", False) else None, zt=zt)
    else:
        emb = Embeddings(z=z, p=z if getattr(m, "predictor", False) else None)
    if method == "moco":
        emb.queue = torch.nn.functional.normalize(torch.randn(16, 6), dim=1)
    return emb, hp, net


@pytest.mark.parametrize("method", ["simclr", "moco", "byol", "simsiam", "barlow", "vicreg"])
def test_every_method_loss_backward_runs_without_tf32(method):
    log = Log()
    with log:
        emb, hp, net = _embeddings(method, log)
        loss, _ = METHODS[method].loss(emb, **hp)
        n_forward = len(log.entries)
        loss.backward()
    assert tf32()
    _split_backward(log.entries[n_forward:])
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_nested_losses_restore_the_flag_once():
    log = Log()

    @full_precision
    def inner(z):
        return (Mark.apply(z, log, "inner") @ z.T).sum()

    @full_precision
    def outer(z):
        return inner(z) + (Mark.apply(z, log, "outer") @ z.T).mean()

    z = torch.randn(4, 3, requires_grad=True)
    with log:
        outer(Mark.apply(z, log, "net")).backward()
    flags = {k: v for k, v in log.entries if "backward" in k}
    assert flags == {"inner.backward": False, "outer.backward": False, "net.backward": True}
    assert tf32()


def test_a_backward_that_stops_inside_the_loss_restores_the_flag():
    inner = []

    @full_precision
    def loss_fn(z):
        mid = z * 2.0
        inner.append(mid)
        return (mid @ mid.T).sum()

    z = torch.randn(4, 3, requires_grad=True)
    loss = loss_fn(z)
    (grad,) = torch.autograd.grad(loss, inner[0])              # the exit fence never runs
    assert grad.shape == (4, 3) and tf32()


def test_gradients_are_unchanged_by_the_fences():
    z = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def plain(t):
        return (t @ t.T).exp().sum().log()

    torch.autograd.gradcheck(full_precision(plain), (z,))
    g1, = torch.autograd.grad(full_precision(plain)(z), z)
    g2, = torch.autograd.grad(plain(z), z)
    assert torch.equal(g1, g2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loss_gradients_on_cuda_are_float32_not_tf32():
    # TF32 keeps 10 mantissa bits (~1e-3 relative): a backward in TF32 misses a float64 reference
    # by ~1e-3, one in float32 by ~1e-6
    g = torch.Generator().manual_seed(0)
    za, zb = (torch.randn(256, 2048, generator=g, dtype=torch.float64) for _ in range(2))
    hp = dict(METHODS["barlow"].DEFAULTS)

    def grads(dtype, device):
        a, b = (z.to(device, dtype).requires_grad_() for z in (za, zb))
        loss, _ = METHODS["barlow"].loss(Embeddings(z=[a, b]), **hp)
        loss.backward()
        return a.grad.double().cpu()

    ref = grads(torch.float64, "cpu")
    got = grads(torch.float32, "cuda")
    assert tf32()
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 1e-4, f"relative gradient error {err:.2e}: the backward ran in TF32"
