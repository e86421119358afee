"""Online linear probe: learns separable features, sends no gradient to them, reads nothing back to
the host, follows the backbone through a forward hook, and resumes with its momentum."""
from __future__ import annotations

import torch
from torch import nn

import masksiam  # noqa: F401
from eval.probe import OnlineProbe
from test_augment_engine import NoHostSync


def _batch(g, n=64, classes=4, dim=16, centres=None):
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + 0.3 * torch.randn(n, dim, generator=g), labels


def test_learns_separable_features_without_touching_them():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 16, generator=g)
    encoder = nn.Linear(16, 16)                      # stands for the backbone: must get no gradient
    probe = OnlineProbe(16, 4, lr=0.1)
    for _ in range(60):
        x, y = _batch(g, centres=centres)
        feats = encoder(x)
        assert feats.requires_grad
        loss, logs = probe.update(feats, y)
        assert not loss.requires_grad and all(not v.requires_grad and v.dim() == 0 for v in logs.values())
    assert encoder.weight.grad is None and encoder.bias.grad is None
    assert logs["probe_top1"] > 0.95 and logs["probe_loss"] < 0.3
    x, y = _batch(g, n=256, centres=centres)
    probe.eval()
    with torch.no_grad():
        assert (probe(encoder(x)).argmax(1) == y).float().mean() > 0.97   # held-out features


def test_shuffled_labels_are_not_learnt():
    g = torch.Generator().manual_seed(1)
    centres = 3 * torch.randn(4, 16, generator=g)
    probe = OnlineProbe(16, 4)
    accs = []
    for _ in range(60):
        x, _ = _batch(g, centres=centres)
        accs.append(probe.update(x, torch.randint(0, 4, (64,), generator=g))[1]["probe_top1"])
    assert torch.stack(accs[-20:]).mean() < 0.45                          # chance is 0.25


def test_no_host_sync_in_the_update():
    probe = OnlineProbe(16, 4)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))
    probe.update(x, y)                                                     # optimizer state created
    with NoHostSync():
        probe.update(x, y)


def test_hook_takes_view_0_of_training_forwards_only():
    backbone = nn.Sequential(nn.Linear(6, 5))
    probe = OnlineProbe(5, 3, bn=False)
    probe.attach(backbone)
    views = torch.randn(2, 4, 6)                                           # 2 views x 4 images
    labels = torch.tensor([0, 1, 2, 0])
    out = backbone(torch.cat(list(views)))                                 # the method's one batch
    backbone.eval()
    backbone(torch.randn(3, 6))                                            # a kNN pass: ignored
    backbone.train()
    before = probe.fc.weight.detach().clone()
    ref = OnlineProbe(5, 3, bn=False)
    ref.load_state_dict(probe.state_dict())
    loss, _ = probe.update_from_hook(labels)
    ref_loss, _ = ref.update(out[:4], labels)
    assert torch.equal(loss, ref_loss) and not torch.equal(before, probe.fc.weight)
    assert torch.equal(probe.fc.weight, ref.fc.weight)
    probe.detach_hook()
    backbone(views[0])
    assert probe._captured is None


def test_state_dict_carries_the_momentum():
    torch.manual_seed(0)
    a = OnlineProbe(8, 3)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    for _ in range(3):
        a.update(x, y)
    b = OnlineProbe(8, 3)
    b.load_state_dict(a.state_dict())
    a.update(x, y), b.update(x, y)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values())
               if isinstance(p, torch.Tensor))
    assert torch.equal(a.fc.weight, b.fc.weight)
