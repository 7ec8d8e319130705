"""A stand-in ClientApp for tests/test_process_backend.py: sleeps, says which process ran it."""

import os
import time


def app(message, context):
    if message == "fail":
        raise ValueError("the client says no")
    if message == "die":  # the process ends mid-message (killed, out of memory)
        os._exit(3)
    started = time.monotonic()
    time.sleep(0.4)
    context["pid"] = os.getpid()  # the context goes back to the engine, as Flower's does
    context["ran"] = (started, time.monotonic())  # CLOCK_MONOTONIC: one clock for all
    return f"{message} done"
