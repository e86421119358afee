"""Export: the file loads strictly into torchvision's and timm's ResNet and gives the backbone's
features; the classifier comes from a probe (BatchNorm folded), a fine-tune, or a fresh init."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torchvision

import masksiam  # noqa: F401
from eval import export
from eval.linear import LinearHead
from masksiam.config import Config, to_dict
from models.resnet import build_backbone_from_config

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def _checkpoint(tmp_path, arch="resnet50", **kw):
    cfg = dataclasses.replace(Config(), arch=arch, size=224, **kw)
    torch.manual_seed(1)
    backbone = build_backbone_from_config(cfg)
    for m in backbone.modules():                     # non-trivial BN statistics and affine terms
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1), m.running_var.uniform_(0.5, 2), m.weight.data.uniform_(0.5, 1.5)
    path = tmp_path / "checkpoint.pt"
    torch.save({"config": to_dict(cfg), "backbone": backbone.state_dict()}, path)
    return path, backbone.eval()


def test_pt_loads_strictly_into_torchvision_resnet50_with_identical_features(tmp_path):
    ckpt, backbone = _checkpoint(tmp_path)
    out = tmp_path / "resnet50.pt"
    info = export.main(["--checkpoint", str(ckpt), "--out", str(out)])
    assert info["fc"].startswith("freshly initialised") and info["num_classes"] == 1000
    assert json.loads(out.with_name("resnet50.pt.json").read_text())["fc"] == info["fc"]
    tv = torchvision.models.resnet50()
    tv.load_state_dict(torch.load(out, weights_only=True), strict=True)
    tv.fc = torch.nn.Identity()
    with torch.no_grad():
        # the same weights; on the CPU masksiam's downsample conv runs subsampled at stride 1
        # (models.resnet.SubsampledConv1x1), torchvision's strided: float rounding apart
        torch.testing.assert_close(tv.eval()(X), backbone(X), rtol=1e-4, atol=1e-4)


def test_safetensors_with_a_probe_head_loads_into_timm_with_identical_outputs(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import load_file, safe_open
    ckpt, backbone = _checkpoint(tmp_path, arch="resnet18")
    head = LinearHead(512, 7, bn=True)
    head.bn.running_mean.uniform_(-1, 1), head.bn.running_var.uniform_(0.5, 3)
    torch.nn.init.normal_(head.fc.weight), torch.nn.init.normal_(head.fc.bias)
    torch.save(head.state_dict(), tmp_path / "linear_head.pt")
    out = tmp_path / "resnet18.safetensors"
    info = export.main(["--checkpoint", str(ckpt), "--out", str(out), "--head", str(tmp_path / "linear_head.pt")])
    assert info["fc"] == "linear probe" and info["num_classes"] == 7
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["fc"] == "linear probe"
    sd = load_file(str(out))
    with torch.no_grad():
        expected = head.eval()(backbone(X))                              # probe on the frozen features
        net = timm.create_model("resnet18", pretrained=False, num_classes=7)
        net.load_state_dict(sd, strict=True)
        assert torch.allclose(net.eval()(X), expected, atol=1e-4, rtol=1e-4)
        tv = torchvision.models.resnet18(num_classes=7)
        tv.load_state_dict(sd, strict=True)
        assert torch.allclose(tv.eval()(X), expected, atol=1e-4, rtol=1e-4)


def test_fine_tuned_fc_is_kept_and_custom_stems_are_refused(tmp_path):
    from eval.finetune import Classifier
    ckpt, backbone = _checkpoint(tmp_path, arch="resnet18")
    model = Classifier(backbone, 4)
    torch.save(dict(model.torchvision_named_state()), tmp_path / "finetuned.pt")
    sd, source = export.export_state_dict(torch.load(tmp_path / "finetuned.pt"), arch="resnet18")
    assert source.startswith("fine-tuned") and torch.equal(sd["fc.weight"], model.fc.weight)
    (tmp_path / "s").mkdir()
    small, _ = _checkpoint(tmp_path / "s", arch="resnet18", stem="small")
    with pytest.raises(SystemExit, match="small stem"):
        export.main(["--checkpoint", str(small), "--out", str(tmp_path / "x.pt")])
    with pytest.raises(SystemExit, match=r"\.pt or \.safetensors"):
        export.main(["--checkpoint", str(ckpt), "--out", str(tmp_path / "x.bin")])
