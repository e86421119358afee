"""The CUDA stream / event graph of augmenting ahead (pipelines/augment/ahead.py), on the CPU.

AugmentAhead takes its stream and event calls from an interface (`CudaStreams`); here a fake with
the same methods records every wait, record and record_stream in one log, next to the loader's
fetches, the augmenter's calls (with the stream that was current) and the training steps. What
must hold for the GPU to overlap aug(k+1) with step k:
  - no stream ever waits on a whole other stream (wait_stream): only on events;
  - step k is preceded by a wait of the main stream on done(k), the event recorded right after
    aug(k) on the side stream, and on nothing recorded later (aug(k+1) is enqueued before step k);
  - the side stream waits only on ready(k), recorded on the main stream after the loader handed
    out batch k, or on nothing when it copies host views itself;
  - the views of batch k stay referenced until done(k) has completed.
A GPU test times the overlap itself (skipped without CUDA)."""
from __future__ import annotations

import contextlib
import gc
import time
import weakref

import pytest
import torch

from pipelines.augment.ahead import AugmentAhead, CudaStreams
from pipelines.augment.engine import build_augmenter
from test_recipes import photo_views

BATCHES = 6


class FakeEvent:
    def __init__(self, streams, n: int):
        self.streams, self.id, self.done, self.where = streams, n, False, None

    def record(self, stream) -> None:
        self.where = stream.name
        self.streams.log.append(("record", stream.name, self.id))

    def query(self) -> bool:
        return self.done


class FakeStream:
    def __init__(self, streams, name: str):
        self.streams, self.name = streams, name

    def wait_event(self, event: FakeEvent) -> None:
        self.streams.log.append(("wait", self.name, event.id))

    def wait_stream(self, other) -> None:                     # what ahead.py must never call
        self.streams.log.append(("wait_stream", self.name, other.name))


class FakeStreams:
    """CudaStreams' methods, recording; `host=True` treats every loader view as a host tensor."""

    def __init__(self, host: bool = False):
        self.log: list[tuple] = []
        self.events: list[FakeEvent] = []
        self.host = host
        self.main = FakeStream(self, "main")
        self._current = self.main

    def current(self):
        return self._current

    def new_stream(self):
        return FakeStream(self, "side")

    def event(self):
        self.events.append(FakeEvent(self, len(self.events)))
        return self.events[-1]

    @contextlib.contextmanager
    def use(self, stream):
        before, self._current = self._current, stream
        try:
            yield
        finally:
            self._current = before

    def record_stream(self, t, stream) -> None:
        self.log.append(("record_stream", stream.name, id(t)))

    def on_host(self, t) -> bool:
        return self.host

    def to_device(self, t):
        self.log.append(("copy", self._current.name))
        return t.clone()


class Batch:
    def __init__(self, views):
        self.views = views


def _augmenter(streams, recipe="plain"):
    """A real augmenter (normalise only: the graph does not depend on the recipe) that logs."""
    aug = build_augmenter(recipe, 16, seed=2)
    call = aug.__call__

    class Logged(type(aug)):                                   # logs the stream current at each call
        def __call__(self, views, return_params=False):
            streams.log.append(("aug", streams.current().name))
            return call(views, return_params)

    aug.__class__ = Logged
    return aug


def _loader(streams, n=BATCHES):
    """Fresh tensors per batch (nothing else holds them), a log entry per fetch."""
    for k in range(n):
        streams.log.append(("fetch", k))
        yield Batch(photo_views(3, 16, 2, seed=k))


def _run_epoch(streams, n=BATCHES, recipe="plain"):
    ahead = AugmentAhead(_augmenter(streams, recipe), streams=streams)
    outs = []
    for k, (batch, out) in enumerate(ahead.epoch(_loader(streams, n))):
        streams.log.append(("step", k, streams.current().name))
        outs.append(out)
    return ahead, outs


def _expected(n: int, host: bool) -> list[tuple]:
    """The log of an epoch of n batches: fetch k+1, ready(k+1) on main, the side stream waits on it
    (or copies the host views itself), aug(k+1) on the side stream, done(k+1) on it; then the main
    stream waits on done(k) and step k runs."""
    log, done, ev = [], {}, 0

    def run(k):
        nonlocal ev
        log.append(("fetch", k))
        if host:
            log.extend([("copy", "side")] * 2)
        else:
            log.extend([("record", "main", ev), ("wait", "side", ev)])
            ev += 1
        log.append(("aug", "side"))
        log.append(("record", "side", ev))
        done[k], ev = ev, ev + 1
        if not host:
            log.extend([("record_stream", "side")] * 2)            # the loader's two views

    run(0)
    for k in range(n):
        if k + 1 < n:
            run(k + 1)
        log.append(("wait", "main", done[k]))
        log.append(("step", k, "main"))
    return log


@pytest.mark.parametrize("host", [False, True])
def test_streams_join_on_events_only_in_the_overlapping_order(host):
    streams = FakeStreams(host=host)
    ahead, outs = _run_epoch(streams)
    assert not [e for e in streams.log if e[0] == "wait_stream"]
    # the hand-over's record_stream of every output onto the main stream: checked, then left out
    log = [e[:2] if e[0] == "record_stream" else e for e in streams.log
           if not (e[0] == "record_stream" and e[1] == "main")]
    assert log == _expected(BATCHES, host)
    # every event the main stream waits on was recorded on the side stream, and the reverse
    for kind, stream, ev in (e for e in streams.log if e[0] == "wait"):
        assert streams.events[ev].where == ("side" if stream == "main" else "main")


def test_outputs_are_handed_to_the_main_stream_before_their_step():
    streams = FakeStreams()
    ahead, outs = _run_epoch(streams, 5)
    steps = [i for i, e in enumerate(streams.log) if e[0] == "step"]
    for k, out in enumerate(outs):
        ids = {id(v) for v in out.views}
        handed = {e[2] for e in streams.log[:steps[k]] if e[:2] == ("record_stream", "main")}
        assert ids <= handed


def test_outputs_equal_the_plain_augmenter():
    direct = build_augmenter("mscn", 16, seed=2)
    expect = [direct(photo_views(3, 16, 2, seed=k)) for k in range(BATCHES)]
    _, outs = _run_epoch(FakeStreams(), recipe="mscn")
    for e, o in zip(expect, outs):
        for x, y in zip(e.views, o.views):
            assert torch.equal(x, y)


def test_a_batch_stays_referenced_until_its_augment_completed():
    streams = FakeStreams()
    ahead = AugmentAhead(_augmenter(streams), streams=streams)
    it = ahead.epoch(_loader(streams))
    batch, out = next(it)                      # batch 0 handed out, batch 1 augmented
    refs = [weakref.ref(v) for v in batch.views]
    del batch, out
    next(it)                                   # batch 1; batch 2 augmented; done(0) not completed
    next(it)                                   # batch 2; batch 3 augmented
    gc.collect()
    assert all(r() is not None for r in refs), "batch 0 released before its augment completed"
    done0 = next(e for e in streams.events if e.where == "side")
    done0.done = True
    next(it)                                   # batch 3; batch 4's run releases what completed
    gc.collect()
    assert all(r() is None for r in refs), "batch 0 still held after its augment completed"
    assert len(ahead._in_flight) >= 2          # batches 1.. whose events did not complete
    it.close()


def test_the_cuda_interface_has_every_method_the_fake_has():
    fake = {m for m in vars(FakeStreams) if not m.startswith("_")} - {"host"}
    assert fake <= set(vars(CudaStreams))


# ---- on a GPU: step time with augment-ahead ~ max(augment, step), not the sum ----------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augment_overlaps_the_step_on_cuda():
    dev = torch.device("cuda")
    aug = build_augmenter("mscn", 224, device=dev, dtype=torch.bfloat16, seed=0)
    n = 64
    host = [photo_views(n, 224, 2, seed=s) for s in range(2)]
    batches = [Batch([v.to(dev) for v in host[k % 2]]) for k in range(12)]
    a = torch.randn(4096, 4096, device=dev)

    def step():
        for _ in range(6):
            torch.mm(a, a, out=a.new_empty(a.shape))

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / len(batches)

    def plain():
        for b in batches:
            aug(b.views)
            step()

    def overlapped():
        for _ in AugmentAhead(aug).epoch(batches):
            step()

    plain(), overlapped()                                  # warm-up
    t_aug = timed(lambda: [aug(b.views) for b in batches])
    t_step = timed(lambda: [step() for _ in batches])
    t_plain, t_ahead = timed(plain), timed(overlapped)
    print(f"aug {t_aug * 1e3:.2f} ms, step {t_step * 1e3:.2f} ms, serial {t_plain * 1e3:.2f} ms, "
          f"ahead {t_ahead * 1e3:.2f} ms")
    # overlap hides at least a third of the shorter of the two
    assert t_ahead < t_plain - min(t_aug, t_step) / 3
