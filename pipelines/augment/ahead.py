"""Augment one batch ahead: batch k+1 goes through the augment stage while batch k trains.

    ahead = AugmentAhead(augment)
    for batch, out in ahead.epoch(loader):      # out = augment(batch.views), computed one batch early
        ... train on out ...
        ahead.state_dict()                      # what a checkpoint stores (see below)

On CUDA the next batch is augmented on a side stream, enqueued before the current step's kernels.
The two streams are joined by events only, never by waiting on a whole stream (which would queue
everything the other stream has, and serialise step k-1, aug k+1, step k, ...):

    main:  ... step k-1 | ready(k+1) |                  wait(done k) | step k ...
    side:                 wait(ready k+1) -> aug(k+1) -> done(k+1)
                          (or: no wait, the host-to-device copy of k+1 on the side stream itself)

- ready(k+1): an event recorded on the main stream right after the loader handed out batch k+1,
  i.e. after its copies (a loader that copies on its own stream makes the main stream wait on its
  copy event first). Views still on the host are instead copied by the side stream, and the side
  stream waits on nothing: pinned host memory, non_blocking.
- done(k): recorded on the side stream after aug(k); the main stream waits on it at the hand-over
  of batch k, so step k waits for aug(k) and not for aug(k+1), which was enqueued after it.
- Memory: the outputs were allocated on the side stream and are used on the main one:
  record_stream(main) at the hand-over keeps the caching allocator from handing their blocks to the
  side stream's next batch too early. The loader's views are read on the side stream: record_stream
  does that for memory the caching allocator owns, and it does nothing for memory it does not (a
  loader's own buffers, DLPack imports), so the views (and the side stream's copies) of batch k are
  also kept referenced until done(k) has completed (polled with Event.query, no host wait).

The stream / event calls go through a small interface (`CudaStreams`), so that tests record the
graph of waits and records with a fake (tests/test_ahead_streams.py).

On the CPU the order of work changes and nothing else: the augmenter draws from its own generators,
so the outputs are the same tensors as augmenting each batch when it is trained.

Exact resume: when the loop stops after step k, the augmenter has already drawn batch k+1, which
was not trained. `state_dict()` is the augmenter's state from before that draw, so a resumed run
draws batch k+1 again, identically.
"""
from __future__ import annotations

import contextlib
from collections import deque
from typing import Any, Iterable, Iterator, NamedTuple, Optional

import torch


def _tensors(obj) -> list[torch.Tensor]:
    """Every tensor an AugmentOutput hands out: views, mixing, masks, drawn parameters (nested)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _tensors(item)]
    if hasattr(obj, "__dict__"):
        return [t for value in vars(obj).values() for t in _tensors(value)]
    return []


class CudaStreams:
    """The stream / event calls AugmentAhead makes, on one CUDA device. A fake with the same methods
    records them in tests; nothing here waits on the host."""

    def __init__(self, device: torch.device):
        self.device = device

    def current(self):
        return torch.cuda.current_stream(self.device)

    def new_stream(self):
        return torch.cuda.Stream(self.device)

    def event(self):
        return torch.cuda.Event()

    def use(self, stream):
        """Make `stream` the current one inside the block."""
        return torch.cuda.stream(stream)

    def record_stream(self, t: torch.Tensor, stream) -> None:
        """Keep the caching allocator from reusing t's block before `stream`'s queued work ran
        (a no-op for memory the allocator does not own)."""
        t.record_stream(stream)

    def on_host(self, t: torch.Tensor) -> bool:
        """A view the side stream copies to the device itself."""
        return t.device.type == "cpu"

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        """Host -> device on the current (side) stream; non_blocking from pinned memory."""
        return t.to(self.device, non_blocking=True)


class _Ahead(NamedTuple):
    batch: Any
    out: Any
    state: dict                 # the augmenter's state before this batch's draw
    done: Any                   # event after aug(batch) on the side stream (None without streams)


class AugmentAhead:
    def __init__(self, augment, enabled: bool = True, streams: Optional[Any] = None):
        """streams: the stream / event interface (default CudaStreams on a CUDA augmenter, none on
        the CPU); tests pass a fake."""
        self.augment, self.enabled = augment, enabled
        if streams is None and enabled and augment.device.type == "cuda":
            streams = CudaStreams(augment.device)
        self.streams = streams if enabled else None
        self.stream = self.streams.new_stream() if self.streams is not None else None
        self._pending_state = None          # augmenter state before the batch still to be trained
        # (done event, tensors the side stream reads) per augmented batch, oldest first: released
        # once the event completed (the side stream runs them in order, so a FIFO)
        self._in_flight: deque = deque()

    def _release(self) -> None:
        """Drop the references of batches whose augment has completed on the device."""
        while self._in_flight and self._in_flight[0][0].query():
            self._in_flight.popleft()

    def _run(self, batch) -> _Ahead:
        state = self.augment.state_dict()
        s = self.streams
        if s is None:
            return _Ahead(batch, self.augment(batch.views), state, None)
        self._release()
        main = s.current()
        if not all(s.on_host(v) for v in batch.views):
            ready = s.event()                         # after the loader's copies of this batch
            ready.record(main)
            self.stream.wait_event(ready)
        with s.use(self.stream):
            views = [s.to_device(v) if s.on_host(v) else v for v in batch.views]
            out = self.augment(views)
            done = s.event()
            done.record(self.stream)
        for v in batch.views:                         # the loader's memory, read on the side stream
            if not s.on_host(v):
                s.record_stream(v, self.stream)
        self._in_flight.append((done, list(batch.views) + views))
        return _Ahead(batch, out, state, done)

    def _hand_over(self, ahead: _Ahead):
        if self.streams is not None:
            main = self.streams.current()
            main.wait_event(ahead.done)                # aug(k) only, not what the side stream has queued since
            for t in _tensors(ahead.out):
                self.streams.record_stream(t, main)
        return ahead.out

    def epoch(self, loader: Iterable) -> Iterator:
        """(batch, augmented output) for every batch of one pass over `loader`."""
        if not self.enabled:
            for batch in loader:
                yield batch, self.augment(batch.views)
            return
        it = iter(loader)
        nxt = next(it, None)
        nxt = self._run(nxt) if nxt is not None else None
        try:
            while nxt is not None:
                current = nxt
                following = next(it, None)
                nxt = self._run(following) if following is not None else None   # overlaps this step
                # a checkpoint after this step: the draws up to this batch, not the next one's
                self._pending_state = nxt.state if nxt is not None else None
                yield current.batch, self._hand_over(current)
                current = None                     # the loop's step holds what it needs
        finally:
            # a loop that stops early closes this generator: the pending state stays for its checkpoint
            with contextlib.suppress(Exception):
                close = getattr(it, "close", None)
                if close is not None:
                    close()

    def state_dict(self) -> dict:
        """The augmenter's state as if no batch beyond the trained ones had been drawn."""
        return self._pending_state if self._pending_state is not None else self.augment.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._pending_state = None
        self.augment.load_state_dict(state)
