"""GlobalBatchNorm's statistics gather (models/syncbn.py, _gather_stats) with a fake 2-rank world in
one process: one all_gather into a preallocated flat buffer, reused layer after layer, or a list
gather where the backend cannot gather into one tensor. The real 2-process gloo runs are in
tests/test_ddp.py."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import models.syncbn as S

C = 5


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    var, mean = torch.var_mean(x, [0, 2, 3], correction=0)
    return mean, var, float(x.numel() // x.shape[1])


class FakeWorld:
    """Rank 0 of two; rank 1 holds `other` (its packed statistics). Records the collectives."""

    def __init__(self, monkeypatch, other: torch.Tensor, into_tensor: bool = True):
        self.other, self.calls = other, []
        monkeypatch.setattr(S, "world_size", lambda: 2)
        monkeypatch.setattr(S, "_BUFFERS", {})
        monkeypatch.setattr(S, "_INTO_TENSOR", {})
        monkeypatch.setattr(dist, "get_backend", lambda *a, **k: "fake")
        into = self.into if into_tensor else self.unsupported
        monkeypatch.setattr(dist, "all_gather_single", into, raising=False)
        monkeypatch.setattr(dist, "all_gather_into_tensor", into)
        monkeypatch.setattr(dist, "all_gather", self.list_gather)

    def rows(self, packed: torch.Tensor) -> torch.Tensor:
        return torch.cat([packed, self.other_packed(packed)])

    def other_packed(self, packed):
        return self.other[:packed.numel()]

    def into(self, out, packed):
        self.calls.append(("into", out.data_ptr(), tuple(out.shape)))
        out.copy_(self.rows(packed))

    def unsupported(self, out, packed):
        self.calls.append(("into-failed",))
        raise RuntimeError("no allgather_into_tensor on this backend")

    def list_gather(self, parts, packed):
        self.calls.append(("list", len(parts)))
        parts[0].copy_(packed)
        parts[1].copy_(self.other_packed(packed))


def _two_ranks(seed: int, n0: int = 4, n1: int = 6):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n0, C, 3, 3, generator=g) * 3 + 10
    x1 = torch.randn(n1, C, 3, 3, generator=g) * 0.5 - 2
    m1, v1, c1 = _stats(x1)
    return x0, x1, torch.cat([m1, v1, m1.new_full((1,), c1)])


@pytest.mark.parametrize("into_tensor", [True, False])
def test_gathered_statistics_are_those_of_both_ranks_batches(monkeypatch, into_tensor):
    x0, x1, other = _two_ranks(0)
    world = FakeWorld(monkeypatch, other, into_tensor)
    mean, var, counts = S._gather_stats(*_stats(x0))
    ref_var, ref_mean = torch.var_mean(torch.cat([x0, x1]), [0, 2, 3], correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, ref_var, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [4 * 9, 6 * 9]
    kinds = [c[0] for c in world.calls]
    assert kinds == (["into"] if into_tensor else ["into-failed", "list"])
    # the backend's answer is kept: a second layer goes straight to the path that works
    S._gather_stats(*_stats(x0))
    assert [c[0] for c in world.calls][len(kinds):] == (["into"] if into_tensor else ["list"])


def test_one_buffer_serves_every_layer_and_nothing_returned_aliases_it(monkeypatch):
    x0, _, other = _two_ranks(1)
    world = FakeWorld(monkeypatch, other)
    first = S._gather_stats(*_stats(x0))
    kept = [t.clone() for t in first]
    x0b, _, other_b = _two_ranks(2, n0=2, n1=3)          # another layer, other values, same width
    world.other = other_b
    second = S._gather_stats(*_stats(x0b))
    (_, ptr1, shape), (_, ptr2, _) = world.calls
    assert ptr1 == ptr2 and shape == (2 * (2 * C + 1),)   # one flat buffer, reused
    for a, b in zip(first, kept):                         # the first layer's results unchanged
        assert torch.equal(a, b)
    assert second[2].tolist() == [18, 27]


def test_a_backend_that_gathered_into_a_tensor_before_raises_its_errors(monkeypatch):
    x0, _, other = _two_ranks(0)
    world = FakeWorld(monkeypatch, other)
    S._gather_stats(*_stats(x0))
    monkeypatch.setattr(dist, "all_gather_single", world.unsupported, raising=False)
    monkeypatch.setattr(dist, "all_gather_into_tensor", world.unsupported)
    with pytest.raises(RuntimeError, match="no allgather_into_tensor"):
        S._gather_stats(*_stats(x0))
