"""Shorter waits in Flower's in-process simulation loop.

Flower 1.41's simulation moves messages with two polling loops that sleep 0.1 s between looks:
the ServerApp's InMemoryGrid waiting for replies, and the engine's extractor handing new
messages to the actors. Every round therefore idles about 0.1 s, more than DP-SGD takes on a
small client. `install()` makes both look again after 5 ms; the extractor, which visits every
node on each look, waits at least 4x what its last look cost, so that with a thousand nodes
it does not take a core away from the clients. It also wakes the engine's queue readers
every 50 ms instead of every second, so a finished run stops at once. Messages, their order
and the results are unchanged: only idle time goes.
"""

from __future__ import annotations

import importlib
import threading
import time
from queue import Queue

from flwr.server.superlink.fleet.vce import vce_api
from flwr.superlink.grid import InMemoryGrid

# the module: `flwr.simulation.run_simulation` the attribute is the function of that name
run_simulation = importlib.import_module("flwr.simulation.run_simulation")

POLL_SECONDS = 0.005


class PromptGrid(InMemoryGrid):
    """Flower's in-memory grid, pulling replies every 5 ms instead of every 100 ms."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("pull_interval", POLL_SECONDS)
        super().__init__(*args, **kwargs)


def add_messages_to_queue(state, queue: Queue, nodes_mapping, f_stop: threading.Event) -> None:
    """vce_api.add_messages_to_queue with a shorter, cost-aware wait between looks."""
    while not f_stop.is_set():
        started = time.perf_counter()
        for node_id in nodes_mapping.keys():
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(max(POLL_SECONDS, 4 * (time.perf_counter() - started)))


class PromptQueue(Queue):
    """The engine's message queues, whose readers wake at least every 50 ms (Flower's wait
    up to 1 s) to see that the run has ended: the last second of every run was idle."""

    def get(self, block: bool = True, timeout: float | None = None):
        return super().get(block, None if timeout is None else min(timeout, 0.05))


def install() -> None:
    """Replace the loops and queues (idempotent). Fails loudly if Flower moved them."""
    if not isinstance(getattr(run_simulation, "InMemoryGrid", None), type) or not callable(
            getattr(vce_api, "add_messages_to_queue", None)) or getattr(
            vce_api, "Queue", None) not in (Queue, PromptQueue):
        raise RuntimeError("flwr's simulation internals moved: update experiments/"
                           "prompt_polling.py for this Flower version")
    run_simulation.InMemoryGrid = PromptGrid
    vce_api.add_messages_to_queue = add_messages_to_queue
    vce_api.Queue = PromptQueue
