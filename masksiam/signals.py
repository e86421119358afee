"""Stopping a run cleanly on SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C)."""
from __future__ import annotations

import signal


class StopOnSignal:
    """SIGTERM / SIGINT (a scheduler's preemption, Ctrl-C) set `.name`; the loop checkpoints at the
    next step boundary and exits. A second Ctrl-C kills at once. The old handlers come back at exit."""

    def __init__(self):
        self.name, self.previous = None, {}

    def _request(self, signum, _frame):
        self.name = signal.Signals(signum).name
        signal.signal(signum, signal.SIG_DFL)

    def __enter__(self) -> "StopOnSignal":
        self.previous = {s: signal.signal(s, self._request) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
