"""Every method's loss against an independent numpy computation of its paper's formula, its gradient
(torch.autograd.gradcheck in float64), multi-pair averaging, the mixed (MixMask / Un-Mix) losses,
MoCo's queue, and the registry's defaults."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from losses import METHODS as ALL_METHODS
from losses import Embeddings, get_method, hparams
from losses import moco
from losses.siamese import Siamese
from losses.mixed import mixed_loss
from masksiam.config import Config, valid_keys

# the Siamese methods: pure losses over embeddings (the MIM methods' losses: tests/test_mim.py)
METHODS = {name: m for name, m in ALL_METHODS.items() if issubclass(m, Siamese)}
HP = {name: dict(m.DEFAULTS) for name, m in METHODS.items()}


def rand(*shape, seed=0, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(grad)


def npy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


# ---- numpy references, written from the papers' formulas ---------------------------------------------

def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def logsumexp(x, axis):
    mx = x.max(axis=axis, keepdims=True)
    return (mx + np.log(np.exp(x - mx).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_nt_xent(a, b, t):
    n = len(a)
    z = unit(np.concatenate([a, b]))
    s = z @ z.T / t
    np.fill_diagonal(s, -np.inf)
    pos = (np.arange(2 * n) + n) % (2 * n)
    return np.mean(logsumexp(s, 1) - s[np.arange(2 * n), pos])


def np_moco(q, k, queue, t):
    q, k = unit(q), unit(k)
    logits = np.concatenate([(q * k).sum(1, keepdims=True), q @ queue.T], 1) / t
    return np.mean(logsumexp(logits, 1) - logits[:, 0])


def np_cos(a, b):
    return (unit(a) * unit(b)).sum(1)


def np_barlow(a, b, lambd, eps=1e-5):
    std = lambda x: (x - x.mean(0)) / np.sqrt(x.var(0) + eps)   # noqa: E731  (biased variance, BatchNorm)
    c = std(a).T @ std(b) / len(a)
    off = c - np.diag(np.diag(c))
    return ((1 - np.diag(c)) ** 2).sum() + lambd * (off ** 2).sum()


def np_vicreg(x, y, sim, std_c, cov_c):
    n, d = x.shape
    inv = ((x - y) ** 2).mean()

    def var_cov(z):
        zc = z - z.mean(0)
        cov = zc.T @ zc / (n - 1)
        std = np.sqrt(np.diag(cov) + 1e-4)
        off = cov - np.diag(np.diag(cov))
        return np.maximum(0, 1 - std).mean(), (off ** 2).sum() / d

    (vx, cx), (vy, cy) = var_cov(x), var_cov(y)
    return sim * inv + std_c * (vx + vy) / 2 + cov_c * (cx + cy)


# ---- registry -------------------------------------------------------------------------------------

def tiny(name: str, **hp):
    """The method `name` around a tiny backbone, small heads."""
    from models.resnet import build_backbone
    cls = METHODS[name]
    small = {"proj_hidden": 16, "proj_dim": 8, "queue_size": 16, "pred_hidden": 16 if cls.predictor else 0}
    return cls(build_backbone("resnet10", small_stem=True, width=4), {**cls.DEFAULTS, **small, **hp})


def test_registry_has_the_method_zoo():
    assert set(METHODS) == {"simclr", "moco", "byol", "simsiam", "barlow", "vicreg"}
    assert set(ALL_METHODS) - set(METHODS) == {"simmim", "mixmae"}            # masked image modeling
    assert [n for n, m in METHODS.items() if m.predictor] == ["byol", "simsiam"]
    assert [n for n, m in METHODS.items() if m.ema] == ["moco", "byol"]
    assert [n for n, m in METHODS.items() if hasattr(tiny(n), "queue")] == ["moco"]
    for name, m in METHODS.items():
        assert m.name == name
        # every key a method reads is a field of its Settings, so `key=value` overrides reach it
        assert set(m.DEFAULTS) == {f.name for f in dataclasses.fields(m.Settings)}
        assert {"proj_hidden", "proj_dim", "proj_layers", "proj_bn", "pred_hidden"} <= set(m.DEFAULTS)
        assert (m.DEFAULTS["pred_hidden"] > 0) == m.predictor
        assert (m.per_sample is None) != (m.pair_loss is None)   # exactly one mixed-loss form


def test_paper_defaults():
    # MoCo v2 as the MixMask paper ran it on ImageNet (Vishniakov et al. 2022, Table 2)
    assert [HP["moco"][k] for k in ("temperature", "queue_size", "ema_momentum", "ema_schedule", "proj_dim",
                                    "moco_symmetric")] == [0.2, 65536, 0.999, "constant", 128, False]
    assert (HP["byol"]["ema_momentum"], HP["byol"]["ema_schedule"]) == (0.996, "cosine")
    assert (HP["byol"]["proj_hidden"], HP["byol"]["proj_dim"], HP["byol"]["pred_hidden"]) == (4096, 256, 4096)
    assert (HP["simclr"]["temperature"], HP["simclr"]["proj_hidden"], HP["simclr"]["proj_dim"]) == (0.2, 2048, 256)
    assert (HP["simsiam"]["proj_dim"], HP["simsiam"]["pred_hidden"], HP["simsiam"]["proj_layers"]) == (2048, 512, 3)
    assert (HP["barlow"]["lambd"], HP["barlow"]["proj_dim"]) == (0.0051, 8192)
    assert [HP["vicreg"][k] for k in ("sim_coeff", "std_coeff", "cov_coeff", "proj_dim")] == [25, 25, 1, 8192]


def test_hparams_take_config_values_over_defaults():
    cfg = Config(method="moco", method_args={"temperature": 0.1, "queue_size": 4096, "lambd": 1.0})
    hp = hparams(get_method("moco"), cfg)
    assert (hp["temperature"], hp["queue_size"], hp["ema_momentum"]) == (0.1, 4096, 0.999)
    assert "lambd" not in hp                                     # another method's key: not moco's
    with pytest.raises(ValueError, match="unknown method 'mocov9'.*barlow"):
        get_method("mocov9")
    with pytest.raises(ValueError, match="'temperature' = 0.0 must be > 0"):
        hparams(get_method("simclr"), Config(method_args={"temperature": 0.0}))
    with pytest.raises(ValueError, match="'ema_momentum' = 1.5 must be in"):
        hparams(get_method("byol"), Config(method_args={"ema_momentum": 1.5}))
    with pytest.raises(ValueError, match="needs a predictor.*pred_hidden"):
        hparams(get_method("simsiam"), Config(method_args={"pred_hidden": 0}))


def test_views_each_branch_embeds():
    pairs = [(0, 1)]
    assert tiny("moco").views(pairs) == ([0], [1])                              # asymmetric: q from 0, k from 1
    assert tiny("moco", moco_symmetric=True).views(pairs) == ([0, 1], [0, 1])
    assert tiny("byol").views([(0, 2), (1, 2)]) == ([0, 1, 2], [0, 1, 2])
    assert tiny("simclr").views([(0, 2), (1, 2)]) == ([0, 1, 2], [])


# ---- each loss against its formula, and its gradient ------------------------------------------------

N, D, K = 6, 5, 7


def test_simclr_matches_numpy_and_gradcheck():
    za, zb = rand(N, D, seed=1, grad=True), rand(N, D, seed=2, grad=True)
    loss, logs = METHODS["simclr"].loss(Embeddings(z=[za, zb]), temperature=0.3)
    assert loss.item() == pytest.approx(np_nt_xent(npy(za), npy(zb), 0.3), rel=1e-10)
    assert set(logs) == {"loss", "pos_acc", "z_std"} and not any(v.requires_grad for v in logs.values())
    assert torch.autograd.gradcheck(lambda a, b: METHODS["simclr"].loss(Embeddings(z=[a, b]), temperature=0.3)[0],
                                    (za, zb))


def test_moco_matches_numpy_and_gradcheck():
    q, k = rand(N, D, seed=1, grad=True), rand(N, D, seed=2)
    queue = moco.init_queue(K, D, seed=3).double()
    emb = Embeddings(z=[q, None], zt=[None, k], queue=queue)
    loss, logs = METHODS["moco"].loss(emb, **{**HP["moco"], "temperature": 0.2})
    assert loss.item() == pytest.approx(np_moco(npy(q), npy(k), npy(queue), 0.2), rel=1e-10)
    # pos_acc: the positive logit beats every queue logit
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    expect_acc = ((qn * kn).sum(1) > (qn @ queue.t()).max(1).values).double().mean()
    assert logs["pos_acc"].item() == pytest.approx(expect_acc.item())
    f = lambda q_: METHODS["moco"].loss(Embeddings(z=[q_, None], zt=[None, k], queue=queue), **HP["moco"])[0]  # noqa
    assert torch.autograd.gradcheck(f, (q,))


def test_moco_symmetric_averages_both_directions():
    z0, z1, t0, t1 = (rand(N, D, seed=s) for s in range(4))
    queue = moco.init_queue(K, D).double()
    emb = Embeddings(z=[z0, z1], zt=[t0, t1], queue=queue)
    loss, _ = METHODS["moco"].loss(emb, **{**HP["moco"], "moco_symmetric": True})
    expect = (np_moco(npy(z0), npy(t1), npy(queue), 0.2) + np_moco(npy(z1), npy(t0), npy(queue), 0.2)) / 2
    assert loss.item() == pytest.approx(expect, rel=1e-10)


def test_moco_key_gets_no_gradient_and_missing_queue_is_named():
    q, k = rand(N, D, seed=1, grad=True), rand(N, D, seed=2, grad=True)
    emb = Embeddings(z=[q, None], zt=[None, k], queue=moco.init_queue(K, D).double())
    METHODS["moco"].loss(emb, **HP["moco"])[0].backward()
    assert q.grad is not None and k.grad is None
    with pytest.raises(ValueError, match="emb.queue"):
        METHODS["moco"].loss(Embeddings(z=[q, None], zt=[None, k]), **HP["moco"])


def test_byol_matches_numpy_symmetrised_and_gradcheck():
    p0, p1 = rand(N, D, seed=1, grad=True), rand(N, D, seed=2, grad=True)
    t0, t1 = rand(N, D, seed=3), rand(N, D, seed=4)
    emb = Embeddings(z=[rand(N, D, seed=5), rand(N, D, seed=6)], p=[p0, p1], zt=[t0, t1])
    loss, logs = METHODS["byol"].loss(emb, **HP["byol"])
    # Grill et al. Eq. 2: L + L~, each ||p/|p| - z/|z|||^2 averaged over the batch
    sq = lambda p, z: (((unit(npy(p)) - unit(npy(z))) ** 2).sum(1)).mean()   # noqa: E731
    assert loss.item() == pytest.approx(sq(p0, t1) + sq(p1, t0), rel=1e-10)
    assert logs["cos"].item() == pytest.approx((np_cos(npy(p0), npy(t1)).mean() + np_cos(npy(p1), npy(t0)).mean()) / 2)
    f = lambda a, b: METHODS["byol"].loss(Embeddings(z=emb.z, p=[a, b], zt=[t0, t1]), **HP["byol"])[0]  # noqa
    assert torch.autograd.gradcheck(f, (p0, p1))


def test_byol_gradient_matches_the_analytic_one():
    # d/dp (2 - 2 cos(p, z)) = -2 (z^ - cos p^) / |p|, averaged over the batch (and 2 directions)
    p0, p1 = rand(N, D, seed=1, grad=True), rand(N, D, seed=2, grad=True)
    t0, t1 = rand(N, D, seed=3), rand(N, D, seed=4)
    METHODS["byol"].loss(Embeddings(z=[t0, t1], p=[p0, p1], zt=[t0, t1]), **HP["byol"])[0].backward()
    p, z = npy(p0), npy(t1)
    cos = np_cos(p, z)[:, None]
    expect = -2 * (unit(z) - cos * unit(p)) / np.linalg.norm(p, axis=1, keepdims=True) / N
    np.testing.assert_allclose(npy(p0.grad), expect, rtol=1e-10, atol=1e-12)


def test_simsiam_matches_numpy_with_stop_gradient():
    p0, p1 = rand(N, D, seed=1, grad=True), rand(N, D, seed=2, grad=True)
    z0, z1 = rand(N, D, seed=3, grad=True), rand(N, D, seed=4, grad=True)
    loss, logs = METHODS["simsiam"].loss(Embeddings(z=[z0, z1], p=[p0, p1]), **HP["simsiam"])
    expect = -np_cos(npy(p0), npy(z1)).mean() / 2 - np_cos(npy(p1), npy(z0)).mean() / 2
    assert loss.item() == pytest.approx(expect, rel=1e-10)
    loss.backward()
    assert z0.grad is None and z1.grad is None                  # stop-gradient on the projections
    assert logs["z_std"].item() == pytest.approx(
        np.mean([unit(npy(z)).std(0, ddof=1).mean() for z in (z0, z1)]), rel=1e-10)
    f = lambda a, b: METHODS["simsiam"].loss(Embeddings(z=[z0, z1], p=[a, b]), **HP["simsiam"])[0]  # noqa
    assert torch.autograd.gradcheck(f, (p0, p1))


@pytest.mark.parametrize("n,d", [(6, 5), (4, 9)])   # batch above and below the dimension
def test_barlow_matches_numpy_and_gradcheck(n, d):
    za, zb = rand(n, d, seed=1, grad=True), rand(n, d, seed=2, grad=True)
    for lambd in (0.0051, 0.5):
        loss, logs = METHODS["barlow"].loss(Embeddings(z=[za, zb]), lambd=lambd)
        assert loss.item() == pytest.approx(np_barlow(npy(za), npy(zb), lambd), rel=1e-9)
    f = lambda a, b: METHODS["barlow"].loss(Embeddings(z=[a, b]), lambd=0.5)[0]   # noqa: E731
    assert torch.autograd.gradcheck(f, (za, zb))


def test_barlow_of_identical_standardised_views_is_its_off_diagonal():
    # za = zb with orthogonal standardised columns: C = I up to BatchNorm's eps, so the loss ~ 0
    za = torch.tensor(np.linalg.qr(np.random.default_rng(0).standard_normal((8, 8)))[0][:, :4] * np.sqrt(8))
    za = za - za.mean(0)
    loss, logs = METHODS["barlow"].loss(Embeddings(z=[za, za.clone()]), lambd=1.0)
    assert logs["on_diag"].item() < 1e-8 and abs(logs["off_diag"].item()) < 0.05


@pytest.mark.parametrize("n,d", [(6, 5), (4, 9)])
def test_vicreg_matches_numpy_and_gradcheck(n, d):
    x, y = rand(n, d, seed=1, grad=True) * 0.3, rand(n, d, seed=2, grad=True) * 2   # some stds below 1
    hp = {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0}
    loss, logs = METHODS["vicreg"].loss(Embeddings(z=[x, y]), **hp)
    assert loss.item() == pytest.approx(np_vicreg(npy(x), npy(y), 25, 25, 1), rel=1e-9)
    assert logs["invariance"].item() == pytest.approx(((npy(x) - npy(y)) ** 2).mean(), rel=1e-10)
    hp2 = {"sim_coeff": 1.5, "std_coeff": 2.0, "cov_coeff": 3.0}
    assert METHODS["vicreg"].loss(Embeddings(z=[x, y]), **hp2)[0].item() == pytest.approx(
        np_vicreg(npy(x), npy(y), 1.5, 2.0, 3.0), rel=1e-9)
    f = lambda a, b: METHODS["vicreg"].loss(Embeddings(z=[a, b]), **hp2)[0]   # noqa: E731
    assert torch.autograd.gradcheck(f, (x.detach().requires_grad_(), y.detach().requires_grad_()))


def _emb(method: str, views: int, seed: int = 0) -> Embeddings:
    zs = [rand(N, D, seed=seed + v) for v in range(views)]
    ps = [rand(N, D, seed=seed + 10 + v) for v in range(views)]
    zts = [rand(N, D, seed=seed + 20 + v) for v in range(views)]
    m = METHODS[method]
    return Embeddings(z=zs, p=ps if m.predictor else None, zt=zts if m.ema else None,
                      queue=moco.init_queue(K, D).double() if method == "moco" else None)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_multi_mask_pairs_average_single_pair_losses(method):
    # MSCN multi-mask: masked views 0 and 1 of branch A, each paired with branch B (view 2)
    emb = _emb(method, 3)
    hp = HP[method]
    multi, _ = METHODS[method].loss(Embeddings(**{**emb.__dict__, "pairs": [(0, 2), (1, 2)]}), **hp)
    singles = [METHODS[method].loss(Embeddings(**{**emb.__dict__, "pairs": [pair]}), **hp)[0] for pair in [(0, 2), (1, 2)]]
    assert multi.item() == pytest.approx(((singles[0] + singles[1]) / 2).item(), rel=1e-10)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_losses_run_in_fp32_inside_autocast(method):
    emb = _emb(method, 2)
    f32 = lambda ts: None if ts is None else [t.float() for t in ts]   # noqa: E731
    emb32 = Embeddings(z=f32(emb.z), p=f32(emb.p), zt=f32(emb.zt), queue=None if emb.queue is None else emb.queue.float())
    ref, _ = METHODS[method].loss(emb32, **HP[method])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, logs = METHODS[method].loss(emb32, **HP[method])
    assert got.dtype == torch.float32 and all(v.dtype == torch.float32 for v in logs.values())
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)      # bf16 matmuls would be off by ~1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_half_inputs_inside_autocast_are_computed_in_fp32(method):
    emb = _emb(method, 2)
    cast = lambda ts, dt: None if ts is None else [t.to("cuda", dt) for t in ts]   # noqa: E731
    queue = None if emb.queue is None else emb.queue.float().cuda()
    half = Embeddings(z=cast(emb.z, torch.bfloat16), p=cast(emb.p, torch.bfloat16), zt=cast(emb.zt, torch.bfloat16),
                      queue=queue)
    up = lambda ts: None if ts is None else [t.float() for t in ts]   # noqa: E731
    ref, _ = METHODS[method].loss(Embeddings(z=up(half.z), p=up(half.p), zt=up(half.zt), queue=queue), **HP[method])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, _ = METHODS[method].loss(half, **HP[method])
    assert got.dtype == torch.float32 and got.item() == pytest.approx(ref.item(), rel=1e-5)


# ---- mixed (MixMask / Un-Mix) losses ----------------------------------------------------------------

LAM = torch.tensor([1.0, 0.0, 0.25, 0.5, 0.9, 0.6], dtype=torch.float64)


def _mixed_inputs(method):
    emb = _emb(method, 2, seed=30)
    z_m, p_m = rand(N, D, seed=40, grad=True), rand(N, D, seed=41, grad=True)
    return emb, z_m, p_m


def mix(method, emb, z_m, p_m, lam, source=0):
    """losses.mixed.Mixed's call: mixed_loss(method, emb, z_m, p_m, lam, source, hp)."""
    return mixed_loss(METHODS[method], emb, z_m, p_m, lam, source, HP[method])


def test_mixed_byol_and_simsiam_are_lam_weighted_cosines():
    lam = LAM.numpy()
    emb, z_m, p_m = _mixed_inputs("byol")
    loss, logs = mix("byol", emb, z_m, p_m, LAM)
    t = npy(emb.zt[1])
    expect = np.mean(lam * (2 - 2 * np_cos(npy(p_m), t)) + (1 - lam) * (2 - 2 * np_cos(npy(p_m), t[::-1])))
    assert loss.item() == pytest.approx(expect, rel=1e-10) and logs["mix_loss"].item() == loss.item()
    emb, z_m, p_m = _mixed_inputs("simsiam")
    zb = emb.z[1].requires_grad_()
    loss, _ = mix("simsiam", emb, z_m, p_m, LAM)
    t = npy(zb)
    assert loss.item() == pytest.approx(np.mean(-lam * np_cos(npy(p_m), t) - (1 - lam) * np_cos(npy(p_m), t[::-1])))
    loss.backward()
    assert zb.grad is None and p_m.grad is not None and z_m.grad is None   # stop-grad target; predictor branch


def test_mixed_simclr_is_soft_target_infonce_over_the_other_view():
    emb, z_m, _ = _mixed_inputs("simclr")
    loss, _ = mix("simclr", emb, z_m, None, LAM)
    s = unit(npy(z_m)) @ unit(npy(emb.z[1])).T / HP["simclr"]["temperature"]   # query i vs key j of view b
    rows, rev, lam = np.arange(N), np.arange(N)[::-1], LAM.numpy()
    expect = np.mean(logsumexp(s, 1) - lam * s[rows, rows] - (1 - lam) * s[rows, rev])
    assert loss.item() == pytest.approx(expect, rel=1e-10)


def test_mixed_moco_uses_queue_negatives_per_positive():
    emb, z_m, _ = _mixed_inputs("moco")
    loss, _ = mix("moco", emb, z_m, None, LAM)
    q, k, queue = npy(z_m), npy(emb.zt[1]), npy(emb.queue)
    per = lambda kk: np.array([np_moco(q[i:i + 1], kk[i:i + 1], queue, 0.2) for i in range(N)])   # noqa: E731
    lam = LAM.numpy()
    assert loss.item() == pytest.approx(np.mean(lam * per(k) + (1 - lam) * per(k[::-1])), rel=1e-10)


def test_mixed_lam_one_is_the_plain_per_sample_loss_and_scalar_lam_broadcasts():
    emb, z_m, p_m = _mixed_inputs("byol")
    one, _ = mix("byol", emb, z_m, p_m, 1.0)
    assert one.item() == pytest.approx(np.mean(2 - 2 * np_cos(npy(p_m), npy(emb.zt[1]))), rel=1e-10)
    half_t, _ = mix("byol", emb, z_m, p_m, torch.full((N,), 0.3, dtype=torch.float64))
    half_f, _ = mix("byol", emb, z_m, p_m, 0.3)
    assert half_t.item() == pytest.approx(half_f.item(), rel=1e-12)
    # hp=None means the method's defaults; the module function is the same computation
    assert mixed_loss(METHODS["byol"], emb, z_m, p_m, 0.3)[0].item() == pytest.approx(half_f.item(), rel=1e-12)


def test_mixed_source_is_compared_with_its_partner_view():
    emb, z_m, p_m = _mixed_inputs("byol")
    from_1, _ = mix("byol", emb, z_m, p_m, 1.0, source=1)          # mixed copy of view 1 -> target view 0
    assert from_1.item() == pytest.approx(np.mean(2 - 2 * np_cos(npy(p_m), npy(emb.zt[0]))), rel=1e-10)
    multi = Embeddings(**{**emb.__dict__, "pairs": [(0, 1), (2, 1)]})
    with pytest.raises(ValueError, match="view 3 .* none of the pairs"):
        mix("byol", multi, z_m, p_m, 1.0, source=3)


@pytest.mark.parametrize("method", ["barlow", "vicreg"])
def test_mixed_batch_statistics_methods_use_the_mixed_target(method):
    emb, z_m, _ = _mixed_inputs(method)
    loss, _ = mix(method, emb, z_m, None, LAM)
    t = npy(emb.z[1])
    lam = LAM.numpy()[:, None]
    t_mix = lam * t + (1 - lam) * t[::-1]
    ref = (np_barlow(npy(z_m), t_mix, HP["barlow"]["lambd"]) if method == "barlow"
           else np_vicreg(npy(z_m), t_mix, 25, 25, 1))
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    # lam = 1: the method's own loss of the pair (mixed view, view b)
    own, _ = METHODS[method].loss(Embeddings(z=[z_m, emb.z[1]]), **HP[method])
    assert mix(method, emb, z_m, None, 1.0)[0].item() == pytest.approx(own.item(), rel=1e-12)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_mixed_loss_gradcheck(method):
    emb, z_m, p_m = _mixed_inputs(method)
    if METHODS[method].predictor:   # the mixed branch's gradient reaches the loss through p_m
        assert torch.autograd.gradcheck(lambda pm: mix(method, emb, z_m, pm, LAM)[0], (p_m,))
    else:
        assert torch.autograd.gradcheck(lambda zm: mix(method, emb, zm, None, LAM)[0], (z_m,))


def test_mixed_loss_names_what_is_missing():
    emb, z_m, _ = _mixed_inputs("byol")
    with pytest.raises(ValueError, match="p_m"):
        mix("byol", emb, z_m, None, 0.5)
    with pytest.raises(ValueError, match=r"emb.zt \(EMA target\)\[1\]"):
        mix("byol", Embeddings(z=emb.z, p=emb.p, zt=[emb.zt[0], None]), z_m, z_m, 0.5)
    with pytest.raises(ValueError, match="lam must be"):
        mix("simclr", emb, z_m, None, torch.ones(N + 1))


# ---- MoCo queue -------------------------------------------------------------------------------------

def test_queue_init_is_unit_and_seeded():
    q = moco.init_queue(100, 16, seed=5)
    assert q.shape == (100, 16) and q.dtype == torch.float32
    torch.testing.assert_close(q.norm(dim=1), torch.ones(100))
    assert torch.equal(q, moco.init_queue(100, 16, seed=5)) and not torch.equal(q, moco.init_queue(100, 16, seed=6))


def test_enqueue_writes_in_order_and_wraps():
    queue = torch.zeros(10, 3)
    keys = torch.eye(3).repeat(3, 1)[:4] * torch.arange(1, 5)[:, None].float()   # 4 keys, distinct norms
    ptr = moco.enqueue(queue, 0, keys)
    assert ptr == 4
    torch.testing.assert_close(queue[:4], torch.nn.functional.normalize(keys, dim=1))
    assert queue[4:].abs().sum() == 0
    ptr = moco.enqueue(queue, 8, keys)                       # slots 8, 9, 0, 1
    assert ptr == 2
    expect = torch.nn.functional.normalize(keys, dim=1)
    torch.testing.assert_close(queue[[8, 9, 0, 1]], expect)
    big = torch.randn(23, 3)                                 # more keys than slots: the newest 10 survive
    ptr = moco.enqueue(queue, 5, big)
    assert ptr == (5 + 23) % 10
    slots = (5 + torch.arange(23)) % 10
    torch.testing.assert_close(queue[slots[-10:]], torch.nn.functional.normalize(big[-10:], dim=1))


def test_moco_loss_survives_enqueue_before_backward():
    q, k = rand(N, D, seed=1, grad=True, dtype=torch.float32), rand(N, D, seed=2, dtype=torch.float32)
    queue = moco.init_queue(K, D)
    before = queue.clone()
    emb = Embeddings(z=[q, None], zt=[None, k], queue=queue)
    loss, _ = METHODS["moco"].loss(emb, **HP["moco"])
    assert torch.equal(queue, before)
    moco.enqueue(queue, 0, k)                                    # the in-place write MoCo does per step
    loss.backward()                                              # the loss kept its own copy of the queue
    ref = q.detach().clone().requires_grad_()
    METHODS["moco"].loss(Embeddings(z=[ref, None], zt=[None, k], queue=before), **HP["moco"])[0].backward()
    torch.testing.assert_close(q.grad, ref.grad)


def test_queue_object_pushes_the_key_views_and_round_trips():
    q = moco.Queue.from_hparams({**HP["moco"], "queue_size": 8, "proj_dim": D}, "cpu")
    assert q.tensor.shape == (8, D) and q.ptr == 0
    zt = [rand(3, D, seed=1), rand(3, D, seed=2)]
    q.push(zt, [(0, 1)])                                        # asymmetric: only the keys of view 1
    torch.testing.assert_close(q.tensor[:3], torch.nn.functional.normalize(zt[1], dim=1).float())
    assert q.ptr == 3
    sym = moco.Queue(8, D, moco_symmetric=True)
    sym.push(zt, [(0, 1)])                                      # symmetric: both views' keys, view order
    torch.testing.assert_close(sym.tensor[:6], torch.nn.functional.normalize(torch.cat(zt), dim=1).float())
    restored = moco.Queue(8, D, seed=9)
    restored.load_state_dict(q.state_dict())
    assert restored.ptr == 3 and torch.equal(restored.tensor, q.tensor)
    with pytest.raises(ValueError, match="queue_size, proj_dim"):
        moco.Queue(16, D).load_state_dict(q.state_dict())
