"""How long the processes of a run live: SIGTERM acts as Ctrl-C, and helpers end with
their parent however it ends (even SIGKILL, which no handler sees).

`kill`, `timeout`, Docker and CI stop a process with SIGTERM: `stop_signals` turns it, like
SIGINT, into a `Stopped` (a KeyboardInterrupt) in the main thread, so a run marks itself
interrupted and stops its workers. `die_with_parent` asks Linux to signal a process when
its parent dies (prctl PR_SET_PDEATHSIG): pool workers, whose parent is the fork server,
which itself exits when the `privet` process is gone; and the simulations `privet compare`
starts. Elsewhere it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import signal
import sys
import threading
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1


class Stopped(KeyboardInterrupt):
    """The process was asked to stop (SIGINT or SIGTERM); `signum` says which."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by the signal


def exit_code(interrupt: KeyboardInterrupt) -> int:
    return interrupt.exit_code if isinstance(interrupt, Stopped) else 130


@contextmanager
def stop_signals(quiet_logger: str | None = None, on_stop=None):
    """Within: SIGINT and SIGTERM raise Stopped in the main thread (first muting
    `quiet_logger`, whose threads would otherwise log every worker that goes away, and
    calling `on_stop(signum)`: what other threads must see at once, before the main thread
    gets to handle Stopped; it runs in a signal handler, so keep it to setting a flag)."""
    def on_signal(signum, frame):
        if quiet_logger:
            logging.getLogger(quiet_logger).setLevel(logging.CRITICAL + 1)
        if on_stop is not None:
            on_stop(signum)
        raise Stopped(signum)

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have the kernel send `signum` to this process when its parent exits (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
