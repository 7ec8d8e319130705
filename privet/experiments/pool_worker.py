"""What runs inside the process pool's workers (experiments/process_backend.py); kept apart so
that a worker imports only this and the ClientApp (and pyplot: `warm`)."""

from __future__ import annotations

import importlib
import os
import signal
import threading
import time
import traceback

_app = None


def start(parent: int) -> None:
    """Pool worker initializer. Ctrl-C in a terminal signals the whole process group: the
    parent handles it and stops the pool, a worker finishes the message it has (without a
    KeyboardInterrupt traceback). And a worker ends when the `privet` process (`parent`)
    is gone, even killed with SIGKILL: its own parent is the fork server, which in turn
    exits only once no worker holds its pipe."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), daemon=True,
                     name="privet-parent-watch").start()


def _exit_with(parent: int, every: float = 1.0) -> None:
    while _alive(parent):
        time.sleep(every)
    os._exit(0)


def _alive(pid: int) -> bool:
    """Whether `pid` runs: not gone, not someone else's by now, not a zombie waiting for its
    own parent to reap it (a killed `privet` is one until then)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:  # no /proc (not Linux): the signal test is what there is
        return True


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


def serve(pipe, reference: str, parent: int) -> None:
    """A pool worker's life (process_backend.ProcessPoolBackend): load the ClientApp, say
    so (None, or why not), then answer requests on `pipe` until ("stop",) or the pipe
    closes: ("run", message, context) → run(...); ("call", function, args) → (True,
    result) or (False, the exception, or its text where it does not pickle)."""
    start(parent)
    try:
        load_app(reference)
    except Exception as error:  # noqa: BLE001 - reported to the backend, which raises it
        pipe.send(f"{type(error).__name__}: {error}")
        return
    pipe.send(None)
    while True:
        try:
            request = pipe.recv()
        except (EOFError, OSError):
            return
        if request[0] == "stop":
            return
        if request[0] == "run":
            answer = run(reference, request[1], request[2])
            try:
                pipe.send(answer)
            except Exception as error:  # noqa: BLE001 - a reply that cannot be pickled
                pipe.send((None, request[2], f"the ClientApp's reply cannot be sent back: "
                                             f"{type(error).__name__}: {error}"))
        else:
            _, function, args = request
            try:
                pipe.send((True, function(*args)))
            except Exception as error:  # noqa: BLE001 - the caller raises it, as it was
                try:  # (an OSError stays one: a full disk is told apart from a bug)
                    pipe.send((False, error))
                except Exception:  # noqa: BLE001 - an error that does not pickle: its text
                    pipe.send((False, f"{type(error).__name__}: {error}"))
