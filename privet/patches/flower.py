"""Flower's private internals, patched: the simulation's polling, node order, backend, loader.

Written against Flower 1.41 (`WRITTEN_FOR`); `install()` refuses another version.

1. Prompt polling. Flower 1.41's simulation moves messages with two polling loops that sleep
   0.1 s between looks: the ServerApp's InMemoryGrid waiting for replies, and the engine's
   extractor handing new messages to the actors. Every round therefore idles about 0.1 s,
   more than DP-SGD takes on a small client. These look again after 5 ms; the extractor,
   which visits every node on each look, waits at least 4x what its last look cost, so that
   with a thousand nodes it does not take a core away from the clients. The engine's queue
   readers wake every 50 ms instead of every second, so a finished run stops at once.
   Messages, their order and the results are unchanged: only idle time goes.
   `PRIVET_PROMPT_POLLING=0` leaves this one out (for comparisons).
2. Node order. Flower's `_register_nodes` gives node ids at random and maps them to
   partitions in creation order; the server samples clients among sorted node ids. Mapping
   partition i to the i-th smallest id makes a seeded run sample the same clients every run.
3. The process pool (`process_pool_backend`): Flower 1.41 builds `raybackend.RayBackend`
   whatever backend name it is given; within the context it builds privet's instead.
4. The launcher's loader guard (`guard_client_app_loader`): a warm launcher's preloaded
   ClientApp must not shadow a FAB that differs from it.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from queue import Queue

from privet.patches import PatchError, check_version

WRITTEN_FOR = ("1.41.",)
INSTALLED = False
PROMPT_POLLING_ENV = "PRIVET_PROMPT_POLLING"  # "0" keeps Flower's own 100 ms polling
POLL_SECONDS = 0.005


def _simulation_modules():
    from flwr.server.superlink.fleet.vce import vce_api

    # the module `flwr.simulation.run_simulation` (the package exports a function so named)
    return importlib.import_module("flwr.simulation.run_simulation"), vce_api


def _prompt_grid():
    from flwr.superlink.grid import InMemoryGrid

    class PromptGrid(InMemoryGrid):
        """Flower's in-memory grid, pulling replies every 5 ms instead of every 100 ms."""

        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("pull_interval", POLL_SECONDS)
            super().__init__(*args, **kwargs)

    return PromptGrid


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


def nodes_in_order(register):
    """Flower's `_register_nodes`, then partition i goes to the i-th smallest node id."""
    def register_nodes(num_nodes, state_factory):
        mapping = register(num_nodes=num_nodes, state_factory=state_factory)
        return {node_id: i for i, node_id in enumerate(sorted(mapping))}

    register_nodes.original = register
    return register_nodes


def install() -> None:
    """Install patches 1 and 2 (idempotent). Raises privet.patches.PatchError for a Flower
    version they were not written for, or whose internals moved."""
    global INSTALLED
    if INSTALLED:
        return
    check_version("flwr", importlib.metadata.version("flwr"), WRITTEN_FOR)
    run_simulation, vce_api = _simulation_modules()
    if not isinstance(getattr(run_simulation, "InMemoryGrid", None), type) or not callable(
            getattr(vce_api, "add_messages_to_queue", None)) or getattr(
            vce_api, "Queue", None) is not Queue or not callable(
            getattr(vce_api, "_register_nodes", None)):
        raise PatchError("flwr's simulation internals moved: update privet/patches/flower.py "
                         "for this Flower version")
    if os.environ.get(PROMPT_POLLING_ENV, "1") != "0":
        run_simulation.InMemoryGrid = _prompt_grid()
        vce_api.add_messages_to_queue = add_messages_to_queue
        vce_api.Queue = PromptQueue
    vce_api._register_nodes = nodes_in_order(vce_api._register_nodes)
    INSTALLED = True


@contextmanager
def process_pool_backend(backend: type):
    """Within: Flower's simulation runtime builds `backend` where it would build Ray's.
    Only with the patches installed (raises PatchError otherwise)."""
    if not INSTALLED:
        raise PatchError("the process pool replaces a Flower internal: install "
                         "privet.patches first, or run stock on Ray")
    from flwr.server.superlink.fleet.vce.backend import raybackend  # imports Ray: only here

    original = raybackend.RayBackend
    raybackend.RayBackend = backend
    try:
        yield
    finally:
        raybackend.RayBackend = original


def guard_client_app_loader(runtime, stale: Callable[[str, str, str], list[str]],
                            drop: Callable[[], None], log) -> None:
    """Wrap `runtime.get_load_client_app_fn` (flwr.supernode.runtime.run_clientapp) so that
    before the ClientApp loads, `stale(fab_id, fab_version, fab_hash)` names preloaded
    modules whose source differs from the FAB's; if any, `drop()` forgets them and the FAB's
    own code is imported."""
    make_loader = runtime.get_load_client_app_fn

    def get_load_client_app_fn(*args, **kwargs):
        load = make_loader(*args, **kwargs)

        def load_checked(fab_id: str, fab_version: str, fab_hash: str):
            differing = stale(fab_id, fab_version, fab_hash)
            if differing:
                log.warning("FAB differs from the preloaded code (%s): importing the FAB's "
                            "modules for this task", ", ".join(differing[:5]))
                drop()
            return load(fab_id, fab_version, fab_hash)
        return load_checked

    runtime.get_load_client_app_fn = get_load_client_app_fn
