"""Online linear probe: a classifier trained on detached backbone features during pretraining
(FFCV-SSL's online linear evaluation), a live signal of representation quality at almost no cost.

    probe = OnlineProbe(backbone.num_features, num_classes).to(device)
    probe.attach(backbone)                  # forward hook: keeps the latest training-mode output
    ...                                     # the method's forward runs the backbone
    loss, logs = probe.update_from_hook(batch.labels)   # view 0's rows; logs["probe_top1"], ...

    loss, logs = probe.update(features, labels)         # or with the features in hand: (N, F), (N,)

`update` trains the probe by one step of its own optimiser (SGD, momentum 0.9) on the features,
detached: no gradient reaches the backbone, and the pretraining optimiser, its lr schedule, the
gradient scaler and DDP never see the probe's parameters. Under DDP the probe's gradient is
averaged over ranks (one all-reduce of F*C + C + ... numbers), so every rank keeps the same probe.
Everything stays on the device: the returned loss and logs are detached 0-d tensors (the loop reads
them at its log interval), nothing is read back to the host.

An affine-free BatchNorm on the features (as MAE's linear probe) makes one lr fit every method:
contrastive, BYOL and MIM features differ by orders of magnitude in scale and keep drifting while
the backbone trains. The probe's state (weights, BatchNorm statistics, the optimiser's momentum)
is its state_dict, for checkpoints and exact resume.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from masksiam import dist


class OnlineProbe(nn.Module):
    def __init__(self, num_features: int, num_classes: int, lr: float = 0.1, momentum: float = 0.9,
                 weight_decay: float = 0.0, bn: bool = True):
        super().__init__()
        self.bn = nn.BatchNorm1d(num_features, affine=False) if bn else nn.Identity()
        self.fc = nn.Linear(num_features, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)
        self.optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        self._captured: torch.Tensor | None = None
        self._hook = None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, F) features -> (N, C) logits (float32, autocast off)."""
        with torch.autocast(features.device.type, enabled=False):
            return self.fc(self.bn(features.detach().float()))

    def update(self, features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One SGD step on (N, F) features (detached here) and (N,) labels -> (loss, logs), both
        detached 0-d device tensors: probe_loss, probe_top1."""
        self.train()
        with torch.enable_grad():
            logits = self(features)                                      # (N, C)
            loss = F.cross_entropy(logits, labels)
            grads = torch.autograd.grad(loss, list(self.parameters()))
        if dist.world_size() > 1:                                        # same probe on every rank
            flat = dist.all_reduce_mean(torch.cat([g.reshape(-1) for g in grads]))
            grads = [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]
        for p, g in zip(self.parameters(), grads):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        top1 = (logits.detach().argmax(1) == labels).float().mean()
        loss = loss.detach()
        return loss, {"probe_loss": loss, "probe_top1": top1}

    # ---- the backbone's forward hook ------------------------------------------------------------
    def attach(self, module: nn.Module) -> None:
        """Keep the output of the module's first training-mode forward since the last update (a
        multi-crop step runs the backbone once per crop size: the first holds the global views;
        evaluation passes, e.g. the kNN monitor, are ignored). A (N, F, h, w) output, e.g. the
        last ResNet stage's, which masked image modeling runs without the backbone's own forward,
        is average-pooled to (N, F)."""
        def hook(module, _inputs, output):
            if module.training and self._captured is None:
                out = output.detach()
                self._captured = out.mean((2, 3)) if out.dim() == 4 else out
        self._hook = module.register_forward_hook(hook)

    def detach_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook, self._captured = None, None

    def update_from_hook(self, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """update() on the first len(labels) rows of the captured output: view 0 of each image when
        the method ran its views as one concatenated batch (views[0] first)."""
        if self._captured is None:
            raise RuntimeError("OnlineProbe.update_from_hook: the attached module has not run in training "
                               "mode since the last update")
        feats, self._captured = self._captured[:labels.shape[0]], None
        return self.update(feats, labels)

    # ---- checkpoint state: the optimiser's momentum travels with the module ----------------------
    def get_extra_state(self):
        # a copy: the optimiser's state_dict holds its live momentum tensors, which a probe loading
        # it would otherwise share (and the next update of either would change both)
        return copy.deepcopy(self.optimizer.state_dict())

    def set_extra_state(self, state) -> None:
        self.optimizer.load_state_dict(state)
