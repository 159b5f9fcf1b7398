"""Pre-emption: SIGTERM and Ctrl-C become a request to stop after the current step, so the run can checkpoint first."""

from __future__ import annotations

import signal
import threading
from typing import Any


class GracefulStop:
    """Turns SIGTERM/SIGINT into a request to stop after the current step (a second Ctrl-C aborts at once).

    Inside ``with GracefulStop() as stop:`` the loop polls ``stop.signal_name`` (None until a signal arrives).
    """

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
