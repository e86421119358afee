"""Masked image modeling on ResNets (models/mim.py, losses/simmim.py, losses/mixmae.py, losses/lut.py):
where the mask token goes, what the sparse and mixed encoders may and may not see, the losses."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import masksiam  # noqa: F401
from models.mim import (MaskTokenEncoder, PixelDecoder, SourceEncoder, encoder_stride, expand_mask, stages,
                        stem)
from models.resnet import build_backbone


def _net(arch="resnet10", width=8, small_stem=False, seed=0):
    torch.manual_seed(seed)
    net = build_backbone(arch, small_stem=small_stem, width=width, zero_init_residual=False)
    return net.train()


def _mask(n, cells, seed=1, ratio=0.5):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, cells * cells, generator=g)
    k = int(round(ratio * cells * cells))
    return (scores.argsort(1).argsort(1) < k).view(n, cells, cells)


# ---- architecture ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch,k", [("resnet50x3", 3), ("resnet50x4", 4)])
def test_width_multiplier_scales_every_stage_and_keeps_torchvision_keys(arch, k):
    with torch.device("meta"):
        wide, base = build_backbone(arch), build_backbone("resnet50")
    sw, sb = wide.state_dict(), base.state_dict()
    assert list(sw) == list(sb)                                           # torchvision's key names
    for key in ("conv1.weight", "layer1.0.conv1.weight", "layer4.2.conv3.weight", "layer4.0.downsample.0.weight"):
        assert sw[key].shape[0] == k * sb[key].shape[0], key
    assert wide.num_features == k * 2048


# ---- SimMIM's mask token -----------------------------------------------------------------------------

@pytest.mark.parametrize("small_stem", [False, True])
def test_mask_token_is_exactly_at_the_masked_stem_positions(small_stem):
    net = _net(small_stem=small_stem).eval()
    size, patch = (64, 32) if not small_stem else (32, 8)
    x = torch.randn(3, 3, size, size)
    mask = _mask(3, size // patch)
    enc = MaskTokenEncoder(net)
    plain = stem(net, x)
    tok = enc.tokenized_stem(net, x, mask)
    stride = 4 if not small_stem else 1
    m = mask.repeat_interleave(patch // stride, 1).repeat_interleave(patch // stride, 2)[:, None]   # independent upsampling
    assert m.shape[2:] == plain.shape[2:]
    assert torch.equal(tok, torch.where(m, enc.token.expand_as(plain), plain))
    assert torch.equal(tok[~m.expand_as(tok)], plain[~m.expand_as(plain)])  # nowhere else
    assert m.any() and (~m).any()
    f = enc(net, x, mask)
    assert f.shape == (3, net.num_features, size // encoder_stride(net), size // encoder_stride(net))
    assert torch.equal(f, stages(net, tok))


# ---- the sparse (SparK-style) encoder ---------------------------------------------------------------

@pytest.mark.parametrize("arch,small_stem", [("resnet10", False), ("resnet50", False), ("resnet18", True)])
def test_sparse_encoder_visible_features_do_not_see_masked_pixels(arch, small_stem):
    net = _net(arch, width=4 if arch == "resnet50" else 8, small_stem=small_stem)
    size = 128 if not small_stem else 32
    patch = encoder_stride(net)
    n = 4
    x = torch.randn(n, 3, size, size)
    mask = _mask(n, size // patch, ratio=0.6)
    px = expand_mask(mask, size, size)[:, None]
    noisy = torch.where(px, torch.randn_like(x) * 100, x)                 # change every masked pixel

    twin = copy.deepcopy(net)
    f1 = SourceEncoder.sparse(mask)(net, x)
    f2 = SourceEncoder.sparse(mask)(twin, noisy)
    hidden = expand_mask(mask, f1.shape[2], f1.shape[3])[:, None].expand_as(f1)
    assert torch.equal(f1, f2)                                            # exactly, visible and hidden
    assert torch.count_nonzero(f1[hidden]) == 0 and torch.count_nonzero(f1[~hidden]) > 0
    # running statistics: taken over visible positions only, so the same too
    assert all(torch.equal(a, b) for a, b in zip(net.buffers(), twin.buffers()))


@pytest.mark.parametrize("kind", ["sparse", "mixed"])
def test_source_encoder_without_a_mask_is_the_ordinary_resnet(kind):
    """One source everywhere: conv, pool and BatchNorm (batch statistics and running ones) as torch's."""
    net = _net("resnet50", width=4)
    ref = _net("resnet50", width=4)
    x = torch.randn(4, 3, 64, 64)
    none = torch.zeros(4, 2, 2, dtype=torch.bool)
    enc = SourceEncoder.sparse(none) if kind == "sparse" else SourceEncoder.mixed(none)
    f = enc(net, x)
    expected = stages(ref, stem(ref, x))
    torch.testing.assert_close(f, expected, rtol=1e-4, atol=1e-4)
    for (name, a), b in zip(net.named_buffers(), ref.buffers()):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5, msg=name)


# ---- mixed partial convolution -----------------------------------------------------------------------

def _partial_conv_reference(x, src, weight, stride, padding):
    """Brute force with unfold: at each output position, sum over the window of w * x over positions
    of the output's source (padding counts as any source), times k*k / their count."""
    n, c, h, w = x.shape
    k = weight.shape[-1]
    cols = F.unfold(x, k, padding=padding, stride=stride)                 # (N, C*k*k, L)
    marked = F.pad(src.float()[:, None], (padding,) * 4, value=-1.0)       # -1 = padding
    scols = F.unfold(marked, k, stride=stride)                            # (N, k*k, L)
    ho = (h + 2 * padding - k) // stride + 1
    centre = src[:, ::stride, ::stride].reshape(n, 1, -1).float()          # the output's source
    same = ((scols == centre) | (scols == -1)).float()                    # (N, k*k, L)
    ratio = (k * k) / same.sum(1, keepdim=True)
    cols = cols.view(n, c, k * k, -1) * same[:, None]
    out = torch.einsum("ock,nckl->nol", weight.reshape(weight.shape[0], c, k * k), cols)
    return (out * ratio).view(n, -1, ho, ho), same.sum(1).view(n, ho, ho) == k * k


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (7, 2)])
def test_mixed_conv_is_partial_conv_and_plain_conv_where_the_window_holds_one_source(k, stride):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 6, k, stride, k // 2, bias=False).double()
    x = torch.randn(3, 5, 32, 32, dtype=torch.float64)
    mask = _mask(3, 4)                                                    # 8 px cells
    enc = SourceEncoder.mixed(mask)
    y = enc.conv(conv, x)
    ref, single = _partial_conv_reference(x, expand_mask(mask.long(), 32, 32), conv.weight, stride, k // 2)
    torch.testing.assert_close(y, ref)
    plain = conv(x)
    one = single[:, None].expand_as(y)
    assert one.any() and (~one).any()
    torch.testing.assert_close(y[one], plain[one])                        # ordinary conv there
    assert not torch.allclose(y[~one], plain[~one])                      # and not across sources


@pytest.mark.parametrize("arch,small_stem,size", [("resnet50", False, 128), ("resnet18", True, 32)])
def test_mixed_encoder_features_of_one_image_ignore_the_other_exactly(arch, small_stem, size):
    net = _net(arch, width=4, small_stem=small_stem)
    patch = encoder_stride(net)
    n = 4
    x = torch.randn(n, 3, size, size)
    mask = _mask(n, size // patch)                                        # True = from image B
    px = expand_mask(mask, size, size)[:, None]
    mixed = torch.where(px, x.flip(0), x)
    f = SourceEncoder.mixed(mask)(net, mixed)
    fm = expand_mask(mask, f.shape[2], f.shape[3])[:, None].expand_as(f)
    for changed, kept in ((px, ~fm), (~px, fm)):                          # change B keep A; change A keep B
        other = torch.where(changed, torch.randn_like(mixed) * 50, mixed)
        g = SourceEncoder.mixed(mask)(net, other)
        assert torch.equal(f[kept], g[kept])
        assert not torch.equal(f[~kept], g[~kept])


# ---- decoder -------------------------------------------------------------------------------------------

def test_pixel_decoder_shapes_and_token():
    f = torch.randn(2, 16, 2, 2)
    lin = PixelDecoder(16, 32, depth=0)
    assert lin(f).shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="decoder_depth"):
        lin(f, torch.zeros(2, 2, 2, dtype=torch.bool))
    dec = PixelDecoder(16, 8, depth=1, dim=12)
    hide = torch.zeros(2, 2, 2, dtype=torch.bool)
    hide[0, 0, 0] = True
    a = dec(f, hide)
    b = dec(torch.where(hide[:, None], torch.randn_like(f), f), hide)     # hidden features are replaced
    assert a.shape == (2, 3, 16, 16) and torch.equal(a, b)


# ---- the methods ---------------------------------------------------------------------------------------

from types import SimpleNamespace  # noqa: E402

from losses.lut import BroaderContext  # noqa: E402
from losses.mixmae import MixMAE  # noqa: E402
from losses.simmim import SimMIM, masked_pixel_loss  # noqa: E402
from masksiam.config import ConfigError  # noqa: E402
from models.ema import momentum_at  # noqa: E402

SMALL_HEADS = {"decoder_dim": 16, "proj_hidden": 32, "proj_dim": 16, "pred_hidden": 32}


def _hp(cls, **kw):
    return {**cls.DEFAULTS, **SMALL_HEADS, **kw}


def _smooth_images(n, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 4, 4, generator=g)
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _out(x, masks, second=None):
    views = [x] + ([second] if second is not None else [])
    return SimpleNamespace(views=views, mim_masks=[masks] + ([None] if second is not None else []))


def _capture_decoder(method):
    got = {}

    def hook(_mod, _inp, out):
        out.retain_grad()
        got["pred"] = out
    method.decoder.register_forward_hook(hook)
    return got


@pytest.mark.parametrize("encoder,depth", [("dense", 0), ("sparse", 1)])
def test_simmim_loss_is_l1_on_masked_pixels_and_ignores_visible_ones(encoder, depth):
    torch.manual_seed(0)
    method = SimMIM(_net(small_stem=True), _hp(SimMIM, mim_encoder=encoder, decoder_depth=depth))
    x = _smooth_images(4)
    mask = _mask(4, 4, ratio=0.6)                                         # 8 px patches at 32 px
    got = _capture_decoder(method)
    loss, logs = method(_out(x, mask))
    loss.backward()
    pred, px = got["pred"], expand_mask(mask, 32, 32)[:, None].expand(-1, 3, -1, -1)
    expected = (pred.detach() - x).abs()[px].sum() / px.sum()             # mean over masked pixels and channels
    torch.testing.assert_close(loss.detach(), expected)
    assert torch.count_nonzero(pred.grad[~px]) == 0                      # visible pixels: no gradient
    assert torch.count_nonzero(pred.grad[px]) == px.sum()
    assert set(logs) == {"loss", "mim_loss"} and not logs["loss"].requires_grad


def test_masked_pixel_loss_known_values():
    pred = torch.zeros(1, 3, 2, 2)
    target = torch.arange(12.0).view(1, 3, 2, 2)
    mask = torch.tensor([[True, False], [False, True]]).view(1, 1, 2, 2)
    # masked pixels (0,0) and (1,1): channel values 0,3 / 4,7 / 8,11 -> l1 mean 33/6, l2 mean 259/6
    torch.testing.assert_close(masked_pixel_loss(pred, target, mask, "l1"), torch.tensor(33 / 6))
    torch.testing.assert_close(masked_pixel_loss(pred, target, mask, "l2"), torch.tensor(259 / 6))


def test_mixmae_dual_reconstruction_scores_each_image_on_its_hidden_patches():
    torch.manual_seed(0)
    method = MixMAE(_net(small_stem=True), _hp(MixMAE, decoder_depth=1, norm_pix_loss=False))
    x = _smooth_images(4)
    mask = _mask(4, 4)                                                    # True = from the partner
    got = _capture_decoder(method)
    loss, _ = method(_out(x, mask))
    loss.backward()
    pred = got["pred"]
    assert pred.shape == (8, 3, 32, 32)
    m = expand_mask(mask, 32, 32)[:, None].expand(-1, 3, -1, -1)
    own, partner = pred.detach()[:4], pred.detach()[4:]
    # image i is hidden where its mask is set; its partner x[N-1-i] where it is not
    sq = ((own - x) ** 2)[m].sum() + ((partner - x.flip(0)) ** 2)[~m].sum()
    torch.testing.assert_close(loss.detach(), sq / (m.sum() + (~m).sum()))
    hidden = torch.cat([m, ~m])
    assert torch.count_nonzero(pred.grad[~hidden]) == 0 and torch.count_nonzero(pred.grad[hidden]) == hidden.sum()


def test_mixmae_reconstruction_of_an_image_sees_only_its_visible_pixels():
    """Eval mode (BatchNorm on running statistics): row i's reconstruction is a function of image i's
    visible patches alone; changing image i where it is hidden, or any other image, leaves it exact."""
    torch.manual_seed(0)
    method = MixMAE(_net(small_stem=True), _hp(MixMAE, decoder_depth=1)).eval()
    x = _smooth_images(4)
    mask = _mask(4, 4)
    m = expand_mask(mask, 32, 32)[:, None]
    with torch.no_grad():
        a = method.reconstruct(_out(x, mask))["pred"]
        y = torch.where(m, torch.randn_like(x) * 10, x)                  # every image changed where hidden
        y[1:] = torch.randn_like(y[1:])                                   # and every other image entirely
        b = method.reconstruct(_out(y, mask))["pred"]
    assert torch.equal(a[0], b[0])
    assert not torch.equal(a[1], b[1])


def test_lut_teacher_gets_no_gradient_and_follows_the_ema():
    torch.manual_seed(0)
    method = SimMIM(_net(small_stem=True), _hp(SimMIM, lut_weight=0.25))
    teacher = method.lut.teacher
    assert all(not p.requires_grad for p in teacher.parameters())
    x, mask = _smooth_images(4), _mask(4, 4, ratio=0.6)
    loss, logs = method(_out(x, mask, second=_smooth_images(4, seed=1)))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert method.lut.predictor[0].weight.grad is not None and method.backbone.conv1.weight.grad is not None
    torch.testing.assert_close(logs["loss"], logs["mim_loss"] + 0.25 * logs["lut_loss"])
    with torch.no_grad():                                                 # a step moves the online net
        for p in method.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    before = [t.clone() for t in teacher.backbone.parameters()]
    method.after_step(3, 10)
    mom = momentum_at(3, 10, 0.996, "cosine")
    for t, b, o in zip(teacher.backbone.parameters(), before, method.backbone.parameters()):
        torch.testing.assert_close(t, mom * b + (1 - mom) * o)
    with pytest.raises(ConfigError, match="two crops"):
        method(_out(x, mask))


@pytest.mark.parametrize("name,kw", [("simmim", {}), ("simmim", {"mim_encoder": "sparse", "decoder_depth": 1}),
                                     ("simmim", {"lut_weight": 0.25}), ("mixmae", {"decoder_depth": 1}),
                                     ("mixmae", {"decoder_depth": 1, "lut_weight": 0.25})])
def test_twenty_steps_lower_the_mim_loss(name, kw):
    torch.manual_seed(0)
    cls = SimMIM if name == "simmim" else MixMAE
    method = cls(_net(small_stem=True), _hp(cls, **kw))
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    x = _smooth_images(16)
    second = x + 0.05 * torch.randn_like(x) if kw.get("lut_weight") else None
    losses = []
    for step in range(20):
        mask = _mask(16, 4, seed=step, ratio=0.5 if name == "mixmae" else 0.6)
        loss, logs = method(_out(x, mask, second))
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_step(step, 20)
        losses.append(float(logs["mim_loss"]))
    assert sum(losses[-5:]) / 5 < 0.9 * losses[0], losses


def test_mim_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="decoder_depth"):
        SimMIM(_net(small_stem=True), _hp(SimMIM, mim_encoder="sparse", decoder_depth=0))
    method = SimMIM(_net(small_stem=True), _hp(SimMIM, mim_encoder="sparse", decoder_depth=1))
    with pytest.raises(ConfigError, match="recipe"):
        method(SimpleNamespace(views=[_smooth_images(2)], mim_masks=None))
    with pytest.raises(ConfigError, match="simmim.patch is 4 px.*multiple of 8"):
        method(_out(_smooth_images(2), _mask(2, 8)))
    mix = MixMAE(_net(), _hp(MixMAE))                                     # ImageNet stem: stride 32
    with pytest.raises(ConfigError, match="simmim.patch is 16 px.*multiple of 32"):
        mix(_out(_smooth_images(2, size=64), _mask(2, 4)))


# ---- through train.py ----------------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
MIM_TINY = ["arch=resnet10", "width=8", "size=32", "stem=small", "batch_size=8", "workers=0", "optimizer=adamw",
            "lr=0.001", "weight_decay=0.05", "warmup_epochs=0.5", "log_every=1", "progress=false", "knn_k=5",
            "crop_scale=[0.3,1.0]", "seed=0", "decoder_dim=16", "proj_hidden=32", "proj_dim=16", "pred_hidden=32"]
MIM_RUNS = {
    "simmim": ["method=simmim", "recipe=simmim_8px", "views=1"],
    "simmim_sparse": ["method=simmim", "recipe=simmim_8px", "views=1", "mim_encoder=sparse", "decoder_depth=1"],
    "simmim_lut": ["method=simmim", "recipe=simmim_lut_8px", "views=2", "lut_weight=0.25"],
    "mixmae": ["method=mixmae", "recipe=mixmae_8px", "views=1", "decoder_depth=1"],
    "mixmae_lut": ["method=mixmae", "recipe=mixmae_lut_8px", "views=2", "decoder_depth=1", "lut_weight=0.25"],
}


@pytest.fixture()
def _cpu(monkeypatch):
    monkeypatch.setenv("MASKSIAM_DEVICE", "cpu")


def _mim_args(folder, out, name, run, *extra):
    return [f"data={folder}", f"out_dir={out}", f"run_name={name}", *MIM_TINY, *MIM_RUNS[run], *extra]


def _step_losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("run", sorted(MIM_RUNS))
def test_every_mim_recipe_runs_through_train_py(run, image_folder, tmp_path, _cpu):
    import train
    res = train.main(_mim_args(image_folder, tmp_path, run, run, "epochs=1"))
    losses = _step_losses(Path(res["run_dir"]))
    assert res["exit"] == "finished" and len(losses) == 3 and 0 <= res["knn_top1"] <= 1
    assert all(v == v and v < 1e3 for v in losses.values())
    row = json.loads((Path(res["run_dir"]) / "metrics.jsonl").read_text().splitlines()[0])
    assert "mim_loss" in row and (("lut_loss" in row) == run.endswith("_lut"))


@pytest.mark.parametrize("run", ["simmim", "mixmae"])
def test_mim_resume_continues_bitwise(run, image_folder, tmp_path, _cpu):
    import train
    full = train.main(_mim_args(image_folder, tmp_path, "full", run, "epochs=2"))
    cut = train.main(_mim_args(image_folder, tmp_path, "cut", run, "epochs=2", "max_steps=4"))
    assert cut["step"] == 4
    resumed = train.main(_mim_args(image_folder, tmp_path, "cut", run, "epochs=2", "resume=true"))
    assert resumed["step"] == full["step"] == 6
    assert _step_losses(Path(full["run_dir"])) == _step_losses(Path(resumed["run_dir"]))
    a = torch.load(Path(full["run_dir"]) / "backbone.pt", weights_only=True)
    b = torch.load(Path(resumed["run_dir"]) / "backbone.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("run", ["simmim", "mixmae"])
def test_mim_torchrun_two_processes(run, image_folder, tmp_path, _cpu):
    """torchrun --nproc_per_node=2 (gloo): each rank draws its own masks (the augment stream is per
    rank), so the run cannot equal one process; it must finish with the global batch split, and DDP
    must keep the ranks' weights equal (both ranks export, compared here)."""
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node=2", "train.py",
                *_mim_args(image_folder, tmp_path, "two", run, "epochs=2", "final_eval=false")]
    out = subprocess.run(torchrun, cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    losses = _step_losses(tmp_path / "two")
    assert len(losses) == 6 and all(v == v for v in losses.values())
    state = torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=False, map_location="cpu")
    assert state["step"] == 6


@pytest.mark.parametrize("run", ["simmim", "mixmae"])
def test_show_draws_reconstructions_from_a_checkpoint(run, image_folder, tmp_path, _cpu):
    import train
    from PIL import Image
    from pipelines.tools.show import main as show
    res = train.main(_mim_args(image_folder, tmp_path, run, run, "epochs=1", "final_eval=false"))
    out = tmp_path / "recon.png"
    show(["--checkpoint", str(Path(res["run_dir"]) / "checkpoint.pt"), "--out", str(out), "--images", "3"])
    img = Image.open(out)
    columns = 4 if run == "simmim" else 5
    assert img.size == (columns * 36 + 4, 16 + 3 * 36 + 4)              # 32 px tiles, 4 px gaps


def test_source_encoder_runs_the_stages_forward_hooks():
    """The loop's online probe hooks backbone.layer4; the sparse and mixed encoders run it block by block."""
    net = _net(small_stem=True)
    seen = []
    net.layer4.register_forward_hook(lambda mod, inp, out: seen.append(out))
    f = SourceEncoder.mixed(_mask(2, 4))(net, _smooth_images(2))
    assert len(seen) == 1 and seen[0] is f
