"""What runs inside the process pool's workers (experiments/process_backend.py); kept apart so
that a worker imports only this and the ClientApp."""

from __future__ import annotations

import importlib
import signal
import traceback

_app = None


def ignore_interrupts() -> None:
    """Ctrl-C in a terminal signals the whole process group: the parent handles it and stops
    the pool, a worker finishes the message it has (without a KeyboardInterrupt traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def load_app(reference: str):
    global _app
    if _app is None:
        module, _, attribute = reference.partition(":")
        _app = getattr(importlib.import_module(module), attribute)
    return _app


def run(reference: str, message, context):
    """The ClientApp's reply and the updated context, or the error as text (an exception
    object need not survive pickling back)."""
    try:
        return load_app(reference)(message=message, context=context), context, None
    except Exception as error:  # noqa: BLE001 - reported to Flower as the ClientApp's error
        return None, context, f"{type(error).__name__}: {error}\n{traceback.format_exc()}"
