"""Skipping a non-finite step: step(skip=flag) on every optimizer, state untouched, no stale momentum."""
from __future__ import annotations

import pytest
import torch

import masksiam  # noqa: F401
from masksiam.config import Config, apply
from masksiam.optim import SGD, build_optimizer

OPTIMIZERS = ["sgd", "adamw", "lars"]


def _setup(name: str, seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Linear(6, 4)
    opt = build_optimizer(net, apply(Config(), {"optimizer": name, "weight_decay": 0.01, "momentum": 0.9},
                                     "test"), lr=0.1)
    return net, opt


def _grads(net: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=g)


def _poison_allocator(net: torch.nn.Module) -> None:
    """Free NaN-filled blocks of the parameters' sizes: an empty_like right after gets them back
    (glibc reuses the freed chunk), so uninitialised state shows as NaN instead of as lucky zeros."""
    blocks = [torch.full_like(p, float("nan")) for p in net.parameters() for _ in range(4)]
    del blocks


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_skip_flag_leaves_weights_and_state_untouched(name):
    net, opt = _setup(name)
    _grads(net, 1)
    opt.step(skip=torch.tensor(False))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = [{k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for s in opt.state.values()]
    for p in net.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step(skip=~torch.isfinite(torch.tensor(float("nan"))))
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    for old, new in zip(state, opt.state.values()):
        assert old.keys() and all(torch.equal(old[k], new[k]) for k in old)
    assert not hasattr(opt, "found_inf")          # nothing left on the optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_skipped_first_step_then_a_step_is_the_first_step(name):
    """Step 0 skipped (NaN gradients), step 1 normal == a fresh optimizer's first step. torch's
    fused SGD alone fails this: its momentum comes from empty_like and the skip never fills it."""
    net, opt = _setup(name)
    ref_net, ref_opt = _setup(name)
    _poison_allocator(net)
    for p in net.parameters():
        p.grad = torch.full_like(p, float("nan"))
    opt.step(skip=torch.tensor(True))
    _grads(net, 2)
    opt.step(skip=torch.tensor(False))
    _grads(ref_net, 2)
    ref_opt.step()
    for (k, v), ref in zip(net.state_dict().items(), ref_net.state_dict().values()):
        assert torch.isfinite(v).all(), k
        torch.testing.assert_close(v, ref, msg=k)


def test_sgd_momentum_buffers_start_at_zero():
    net, opt = _setup("sgd")
    assert isinstance(opt, SGD)
    _poison_allocator(net)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    opt.step(skip=torch.tensor(1.0))
    assert all(torch.equal(s["momentum_buffer"], torch.zeros_like(s["momentum_buffer"]))
               for s in opt.state.values())


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_skip_combines_with_a_grad_scaler_flag(name):
    """GradScaler sets found_inf around its call (scaler.step(opt, skip=flag) passes skip on):
    either flag skips, and GradScaler's attribute is left as it was for it to delete."""
    net, opt = _setup(name)
    _grads(net, 1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt.found_inf = torch.tensor(1.0)               # the scaler found an inf, our flag did not
    opt.step(skip=torch.tensor(False))
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert torch.equal(opt.found_inf, torch.tensor(1.0))
    opt.found_inf = torch.tensor(0.0)
    opt.step(skip=torch.tensor(False))
    assert not all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_grad_scaler_passes_skip_through():
    net, opt = _setup("sgd")
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    scaler.scale(net(torch.randn(3, 6)).sum()).backward()
    scaler.step(opt, skip=torch.tensor(True))
    scaler.update()
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    scaler.scale(net(torch.randn(3, 6)).sum()).backward()
    scaler.step(opt, skip=torch.tensor(False))
    assert not all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
