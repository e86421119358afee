"""Augment one batch ahead: batch k+1 goes through the augment stage while batch k trains.

    ahead = AugmentAhead(augment)
    for batch, out in ahead.epoch(loader):      # out = augment(batch.views), computed one batch early
        ... train on out ...
        ahead.state_dict()                      # what a checkpoint stores (see below)

On CUDA the next batch is augmented on a side stream, enqueued before the current step's kernels,
so the two overlap on the GPU and the augment stage leaves the critical path (the side stream
waits for the loader's copies; the step's stream waits for the side stream before reading the
views; record_stream keeps the caching allocator from reusing their memory early). On the CPU the
order of work changes and nothing else: the augmenter draws from its own generators, so the outputs
are the same tensors as augmenting each batch when it is trained.

Exact resume: when the loop stops after step k, the augmenter has already drawn batch k+1, which
was not trained. `state_dict()` is the augmenter's state from before that draw, so a resumed run
draws batch k+1 again, identically.
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

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


class AugmentAhead:
    def __init__(self, augment, enabled: bool = True):
        self.augment, self.enabled = augment, enabled
        cuda = augment.device.type == "cuda"
        self.stream = torch.cuda.Stream(augment.device) if (enabled and cuda) else None
        self._pending_state = None          # augmenter state before the batch still to be trained

    def _run(self, batch):
        state = self.augment.state_dict()
        if self.stream is None:
            return batch, self.augment(batch.views), state
        self.stream.wait_stream(torch.cuda.current_stream(self.augment.device))   # the loader's copies
        with torch.cuda.stream(self.stream):
            out = self.augment(batch.views)
        for v in batch.views:                      # the loader's memory, read on the side stream
            v.record_stream(self.stream)
        return batch, out, state

    def _hand_over(self, out):
        if self.stream is not None:
            current = torch.cuda.current_stream(self.augment.device)
            current.wait_stream(self.stream)
            for t in _tensors(out):
                t.record_stream(current)
        return out

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
                batch, out, _ = nxt
                following = next(it, None)
                nxt = self._run(following) if following is not None else None   # overlaps this step
                # a checkpoint after this step: the draws up to this batch, not the next one's
                self._pending_state = nxt[2] if nxt is not None else None
                yield batch, self._hand_over(out)
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
