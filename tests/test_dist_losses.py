"""2-process gloo runs of the losses that talk across ranks: SimCLR (global negatives), MoCo (queue of
gathered keys), Barlow Twins and VICReg (global batch statistics), and their mixed losses.

A fixed global batch of B = 2N samples is split between 2 processes; each computes its loss and
backward on its half through a shared linear "network" z = x W. A DDP run is exact when
  - the mean over ranks of each rank's loss (and logs) is the 1-process loss on the full batch,
  - each rank's input gradient / world_size is the 1-process gradient of its slice, and
  - the rank-averaged W.grad (what DDP all-reduces) is the 1-process W.grad.
One spawn runs every case (process start-up dominates); it is killed if it runs past TIMEOUT_S.
"""
from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from losses import METHODS, Embeddings
from losses import moco
from losses.mixed import mixed_loss
from models.ema import ema_update, make_target

WORLD, N, D, K = 2, 4, 6, 11
TIMEOUT_S = 120
PTR = K - 3                       # enqueue across the end of the queue
HP = {name: dict(m.DEFAULTS) for name, m in METHODS.items()}
CASES = ["simclr", "moco", "barlow", "vicreg", "mix_simclr", "mix_moco", "mix_barlow", "mix_vicreg"]
LOCAL_LOGS = {"z_std"}            # computed on the local batch by design: a monitor, not a global value


def full_batch():
    """The global batch every process builds identically: views a, b, mixed m, targets t, lam, W."""
    g = torch.Generator().manual_seed(0)
    x = {v: torch.randn(WORLD * N, D, generator=g, dtype=torch.float64) for v in ("a", "b", "m")}
    t = torch.randn(WORLD * N, D, generator=g, dtype=torch.float64)          # EMA keys: no gradient
    lam = torch.rand(WORLD * N, generator=g, dtype=torch.float64)
    w = torch.eye(D, dtype=torch.float64) + 0.3 * torch.randn(D, D, generator=g, dtype=torch.float64)
    return x, t, lam, w


def partner(rank_count: int) -> torch.Tensor:
    """The mixing partner of each sample of the global batch: each rank reverses its own N samples."""
    return torch.cat([torch.arange(N).flip(0) + r * N for r in range(rank_count)])


def run_case(name: str, x: dict, t: torch.Tensor, lam: torch.Tensor, w: torch.Tensor, mix_partner=None):
    """The loss of one case on the given (local or full) tensors. mix_partner: None = the loss's own
    local flip (the distributed run); an index = the 1-process reference with the ranks' partners."""
    z = {v: x[v] @ w for v in x}
    method = name.removeprefix("mix_")
    queue = moco.init_queue(K, D, seed=1).double()
    if method == "moco":
        emb = Embeddings(z=[z["a"], None], zt=[None, t], queue=queue)
    else:
        emb = Embeddings(z=[z["a"], z["b"]])
    if not name.startswith("mix_"):
        return METHODS[method].loss(emb, **HP[method])
    m = METHODS[method]
    if mix_partner is None:
        return mixed_loss(m, emb, z["m"], None, lam, 0, HP[method])
    target = emb.zt[1] if m.ema else emb.z[1]
    if m.per_sample is not None:
        per = lambda tt: m.per_sample(z["m"], tt, queue=queue, **HP[method])   # noqa: E731
        loss = (lam * per(target) + (1 - lam) * per(target[mix_partner])).mean()
    else:
        lam_ = lam[:, None]
        loss, _ = m.pair_loss(z["m"], lam_ * target + (1 - lam_) * target[mix_partner], **HP[method])
    return loss, {"mix_loss": loss.detach()}


def evaluate(name, x, t, lam, w, mix_partner=None) -> dict:
    x = {v: xv.detach().clone().requires_grad_() for v, xv in x.items()}
    w = w.detach().clone().requires_grad_()
    loss, logs = run_case(name, x, t, lam, w, mix_partner)
    loss.backward()
    return {"loss": loss.item(), "logs": {k: v.item() for k, v in logs.items()},
            "grad": {v: xv.grad.clone() if xv.grad is not None else torch.zeros_like(xv) for v, xv in x.items()},
            "w_grad": w.grad.clone()}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=TIMEOUT_S))
    try:
        x, t, lam, w = full_batch()
        part = slice(rank * N, (rank + 1) * N)
        local = {v: xv[part] for v, xv in x.items()}
        results = {name: evaluate(name, local, t[part], lam[part], w) for name in CASES}
        # MoCo: each rank enqueues its own keys; the queue must come out the same everywhere
        queue = moco.init_queue(K, D, seed=1).double()
        results["queue"] = (moco.enqueue(queue, PTR, t[part]), queue)
        # the EMA update sees through DistributedDataParallel
        online = torch.nn.Linear(D, 3)
        target = make_target(online)
        ema_update(target, torch.nn.parallel.DistributedDataParallel(online), 0.0)
        results["ema_ddp"] = all(torch.equal(a, b) for a, b in zip(target.parameters(), online.parameters()))
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("gloo")
    ctx = mp.start_processes(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1):          # raises if a worker failed, with its traceback
            if time.monotonic() > deadline:
                pytest.fail(f"2-process gloo run did not finish in {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("name", CASES)
def test_two_ranks_equal_one_process_on_the_full_batch(ranks, name):
    x, t, lam, w = full_batch()
    ref = evaluate(name, x, t, lam, w, mix_partner=partner(WORLD) if name.startswith("mix_") else None)
    got = [r[name] for r in ranks]
    assert sum(g["loss"] for g in got) / WORLD == pytest.approx(ref["loss"], rel=1e-10, abs=1e-12)
    for key, value in ref["logs"].items():
        if key not in LOCAL_LOGS:
            assert sum(g["logs"][key] for g in got) / WORLD == pytest.approx(value, rel=1e-9, abs=1e-12), key
    for v in ref["grad"]:
        # each rank's input gradient is world_size x its slice of the full-batch gradient ...
        grads = torch.cat([g["grad"][v] for g in got]) / WORLD
        torch.testing.assert_close(grads, ref["grad"][v], rtol=1e-9, atol=1e-12, msg=f"{name}: grad of {v}")
    # ... so DDP's average of the parameter gradients is the full-batch parameter gradient
    w_grad = sum(g["w_grad"] for g in got) / WORLD
    torch.testing.assert_close(w_grad, ref["w_grad"], rtol=1e-9, atol=1e-12)
    assert ref["w_grad"].abs().sum() > 0


def test_moco_queue_gets_every_ranks_keys_in_rank_order(ranks):
    _, t, _, _ = full_batch()
    queue = moco.init_queue(K, D, seed=1).double()
    ptr = moco.enqueue(queue, PTR, t)                       # 1 process, the whole batch
    for r in ranks:
        assert r["queue"][0] == ptr == (PTR + WORLD * N) % K
        torch.testing.assert_close(r["queue"][1], queue, rtol=0, atol=0)


def test_ema_update_through_ddp(ranks):
    assert all(r["ema_ddp"] for r in ranks)
