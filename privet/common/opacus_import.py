"""Opacus, imported on first use and under one lock.

Importing Opacus costs about 1.5 s per process (it pulls in torch.distributed), and the default
path never needs it: DP-SGD runs through clients.bookkeeping, ε through dp-accounting's PLD,
and calibrations come from the disk cache. Its RDP and PRV accountants and its own DP-SGD
load it when asked. The lock: two threads importing Opacus lazily at once (the ServerApp
thread and Flower's loader in simulation) deadlocked.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import warnings
from types import ModuleType

_lock = threading.Lock()


def imported(module: str) -> ModuleType:
    """`module`, imported under the lock that Opacus' lazy imports take."""
    found = sys.modules.get(module)
    if found is not None and not getattr(getattr(found, "__spec__", None), "_initializing",
                                         False):
        return found
    with _lock:
        return importlib.import_module(module)


def opacus(module: str = "opacus") -> ModuleType:
    """`module` (opacus or one of its submodules), imported once."""
    with _lock:
        root = logging.getLogger()
        handlers = list(root.handlers)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = importlib.import_module(module)
        # Opacus calls logging.basicConfig() on import, which would print every Flower log
        # line twice (once by Flower's handler, once by the root handler it adds).
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        return loaded
