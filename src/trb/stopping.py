"""SIGTERM and SIGINT, from process start to exit.

A run is in one of two kinds of phase. Loading and evaluation can be abandoned: nothing they compute is saved state
until they finish, so the signal handler raises `Stopped` at once and the phase is dropped (an evaluation is rerun
on resume). Training steps, checkpoint writes and log appends are deferred: the handler only records the signal and
the loop stops at the next phase boundary, after saving any new state. `trb train` installs the handler before it
imports anything heavy, so a signal never meets Python's defaults (a KeyboardInterrupt traceback, a silent -15).
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """A phase that may be abandoned was interrupted by SIGTERM or SIGINT."""


class StopSignals:
    """Records SIGTERM / SIGINT; raises `Stopped` from the handler while the current phase may be abandoned."""

    def __init__(self):
        self.received: int | None = None  # the first signal's number
        self._abandon = True  # loading, until a run says otherwise
        self._raised = False  # Stopped is raised from the handler once: a second signal must not break the cleanup
        self._previous: dict = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def install(self) -> StopSignals:
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, frame):
        self.received = self.received or signum
        if self._abandon and not self._raised:
            self._raised = True
            raise Stopped(signal.Signals(signum).name)

    @contextmanager
    def phase(self, abandon: bool):
        """Within: a signal raises Stopped (abandon) or is only recorded (deferred). Entering an abandonable phase
        after a signal already arrived raises at once."""
        previous, self._abandon = self._abandon, abandon
        try:
            if abandon and self.received:
                raise Stopped(self.name)
            yield
        finally:
            self._abandon = previous
