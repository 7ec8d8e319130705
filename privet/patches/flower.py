"""Flower's private internals, patched: the simulation's polling, node order, backend, loader.

Written against Flower 1.41 (`WRITTEN_FOR`); `install()` refuses another version.

1. Prompt polling. Flower 1.41's simulation moves messages with two polling loops that sleep
   0.1 s between looks: the ServerApp's InMemoryGrid waiting for replies, and the engine's
   extractor handing new messages to the actors. Every round therefore idles about 0.1 s,
   more than DP-SGD takes on a small client. These look again after 1 ms; the extractor,
   which visits every node on each look, waits at least 4x what its last look cost, so that
   with a thousand nodes it does not take a core away from the clients. The engine's queue
   readers wake every 50 ms instead of every second, so a finished run stops at once.
   Messages, their order and the results are unchanged: only idle time goes.
   `PRIVET_PROMPT_POLLING=0` leaves this one out (for comparisons).
2. Node order. Flower's `_register_nodes` gives node ids at random and maps them to
   partitions in creation order; the server samples clients among sorted node ids. Mapping
   partition i to the i-th smallest id makes a seeded run sample the same clients every run.
3. The process pool (`process_pool_backend`): Flower 1.41 builds `raybackend.RayBackend`
   whatever backend name it is given; within the context it builds privet's instead (and
   where Ray's backend module is not imported yet, a stand-in module spares importing Ray).
4. The launcher's loader guard (`guard_client_app_loader`): a warm launcher's preloaded
   ClientApp must not shadow a FAB that differs from it.
5. Scale (cross-device: 100,000 nodes). Flower builds every node's context before the first
   round, reading and validating pyproject.toml once per node (~20 ms each: 35 minutes
   for 100,000 nodes) and keeping two copies of the run config per node (~1 GB); here a
   node's context is built when its first message arrives, from the config read once. And
   Flower's extractor asks the link state, node by node, for each node's next message, each
   ask scanning every stored message (100,000 asks a look, each O(messages)); here one scan
   finds the nodes that have an undelivered message, and only those are asked, in the same
   node order. Messages, contexts and results are unchanged.
6. A deployed SuperNode's heartbeat (`shorter_node_heartbeat`, only in the process
   `privet deploy supernode` starts): every 10 s (Flower's least) instead of 30, so that a
   node restarted after a crash is let back in after at most 20 s instead of 60.
7. A policy-checked task's input (`reuse_task_input`, only in a launcher's child process):
   the node's policy check pulls the task's input before the app's code loads; Flower's
   `run_clientapp` is handed that same input instead of pulling it a second time.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import os
import sys
import threading
import time
import types
from collections.abc import Callable
from contextlib import contextmanager
from queue import Queue

from privet.patches import WRITTEN_FOR as RELEASES
from privet.patches import PatchError, check_version

WRITTEN_FOR = RELEASES["flwr"]
INSTALLED = False
PROMPT_POLLING_ENV = "PRIVET_PROMPT_POLLING"  # "0" keeps Flower's own 100 ms polling
POLL_SECONDS = 0.001


def _simulation_modules():
    from flwr.server.superlink.fleet.vce import vce_api

    # the module `flwr.simulation.run_simulation` (the package exports a function so named)
    return importlib.import_module("flwr.simulation.run_simulation"), vce_api


def _prompt_grid():
    from flwr.superlink.grid import InMemoryGrid

    class PromptGrid(InMemoryGrid):
        """Flower's in-memory grid, pulling replies every 1 ms instead of every 100 ms."""

        def __init__(self, *args, **kwargs) -> None:
            kwargs.setdefault("pull_interval", POLL_SECONDS)
            super().__init__(*args, **kwargs)

    return PromptGrid


def _waiting_nodes(state, nodes_mapping) -> list[int]:
    """Nodes of `nodes_mapping` with an undelivered message in an InMemoryLinkState, in
    node-id order (the mapping's, see nodes_in_order); all of them for another state."""
    stored = getattr(state, "message_ins_store", None)
    if not isinstance(stored, dict):
        return list(nodes_mapping.keys())
    waiting = {m.metadata.dst_node_id for m in list(stored.values())
               if m.metadata.delivered_at == ""}
    return sorted(n for n in waiting if n in nodes_mapping)


def add_messages_to_queue(state, queue: Queue, nodes_mapping, f_stop: threading.Event) -> None:
    """vce_api.add_messages_to_queue asking only nodes with a message waiting (patch 5),
    with a shorter, cost-aware wait between looks (patch 1)."""
    prompt = os.environ.get(PROMPT_POLLING_ENV, "1") != "0"
    while not f_stop.is_set():
        started = time.perf_counter()
        for node_id in _waiting_nodes(state, nodes_mapping):
            for message in state.get_message_ins(node_id=node_id, limit=1):
                queue.put(message)
        f_stop.wait(max(POLL_SECONDS, 4 * (time.perf_counter() - started)) if prompt else 0.1)


class _NodeStores(dict):
    """vce_api's {node id: DeprecatedRunInfoStore}, each built on first use (patch 5)."""

    def __init__(self, nodes_mapping, run, app_dir, store_type, keys) -> None:
        super().__init__()
        self._mapping, self._run, self._app_dir = nodes_mapping, run, app_dir
        self._store_type, self._keys = store_type, keys
        self._partitions = len(set(nodes_mapping.values()))
        self._lock = threading.Lock()

    def __missing__(self, node_id: int):
        with self._lock:  # the engine's worker threads ask concurrently
            if dict.__contains__(self, node_id):
                return dict.__getitem__(self, node_id)
            partition_key, partitions_key = self._keys
            store = self._store_type(node_id=node_id, node_config={
                partition_key: self._mapping[node_id], partitions_key: self._partitions})
            store.register_context(run_id=self._run.run_id, run=self._run,
                                   app_dir=self._app_dir)
            self[node_id] = store
            return store


def _node_stores(vce_api):
    def register_node_info_stores(nodes_mapping, run, app_dir=None):
        """vce_api._register_node_info_stores, each node's store built on first use."""
        return _NodeStores(nodes_mapping, run, app_dir, vce_api.DeprecatedRunInfoStore,
                           (vce_api.PARTITION_ID_KEY, vce_api.NUM_PARTITIONS_KEY))

    register_node_info_stores.original = vce_api._register_node_info_stores
    return register_node_info_stores


def _fused_once(fuse):
    """get_fused_config_from_dir remembered per (app dir, override config): the same
    pyproject.toml for every node of a run. Each caller gets its own dict."""
    kept: dict = {}

    @functools.wraps(fuse)
    def fused(project_dir, override_config):
        key = (str(project_dir), repr(sorted(override_config.items())))
        if key not in kept:
            kept.clear()  # one run at a time
            kept[key] = fuse(project_dir, override_config)
        return dict(kept[key])

    return fused


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
    """Install patches 1, 2 and 5 (idempotent; 3 and 4 are applied where they are used).
    Raises privet.patches.PatchError for a Flower version they were not written for, or
    whose internals moved."""
    global INSTALLED
    if INSTALLED:
        return
    check_version("flwr", importlib.metadata.version("flwr"), WRITTEN_FOR)
    run_simulation, vce_api = _simulation_modules()
    from flwr.compat.client import run_info_store

    needed = {run_simulation: ("InMemoryGrid",),
              vce_api: ("add_messages_to_queue", "Queue", "_register_nodes",
                        "_register_node_info_stores", "DeprecatedRunInfoStore",
                        "PARTITION_ID_KEY", "NUM_PARTITIONS_KEY"),
              run_info_store: ("get_fused_config_from_dir",)}
    if any(not hasattr(module, name) for module, names in needed.items() for name in names) \
            or vce_api.Queue is not Queue:
        raise PatchError("flwr's simulation internals moved: update privet/patches/flower.py "
                         "for this Flower version")
    if os.environ.get(PROMPT_POLLING_ENV, "1") != "0":
        run_simulation.InMemoryGrid = _prompt_grid()
        vce_api.Queue = PromptQueue
    vce_api.add_messages_to_queue = add_messages_to_queue
    vce_api._register_nodes = nodes_in_order(vce_api._register_nodes)
    vce_api._register_node_info_stores = _node_stores(vce_api)
    run_info_store.get_fused_config_from_dir = _fused_once(
        run_info_store.get_fused_config_from_dir)
    INSTALLED = True


@contextmanager
def process_pool_backend(backend: type):
    """Within: Flower's simulation runtime builds `backend` where it would build Ray's.
    Only with the patches installed (raises PatchError otherwise)."""
    if not INSTALLED:
        raise PatchError("the process pool replaces a Flower internal: install "
                         "privet.patches first, or run stock on Ray")
    name = "flwr.server.superlink.fleet.vce.backend.raybackend"
    raybackend = sys.modules.get(name)
    stand_in = raybackend is None
    if stand_in:
        # Not imported yet (it imports Ray: ~0.4 s, which the process pool never uses):
        # within, Flower's `from .backend.raybackend import RayBackend` finds a stand-in
        raybackend = sys.modules[name] = types.ModuleType(name)
    original = getattr(raybackend, "RayBackend", None)
    raybackend.RayBackend = backend
    try:
        yield
    finally:
        if not stand_in:
            raybackend.RayBackend = original
        elif sys.modules.get(name) is raybackend:
            del sys.modules[name]


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


def reuse_task_input(runtime, pulled) -> None:
    """Patch 7, in a launcher's child process only (one task, then it exits): make
    `runtime.pull_task_input` (flwr.supernode.runtime.run_clientapp) return the task input
    the node's policy check already pulled (message, context, run, FAB): the SuperNode hands
    it out once per token. Raises PatchError where the function moved."""
    check_version("flwr", importlib.metadata.version("flwr"), WRITTEN_FOR)
    if not callable(getattr(runtime, "pull_task_input", None)):
        raise PatchError("flwr's run_clientapp.pull_task_input moved: update "
                         "privet/patches/flower.py for this Flower version")
    runtime.pull_task_input = lambda _client: pulled


NODE_HEARTBEAT_SECONDS = 10  # Flower's least (HEARTBEAT_MIN_INTERVAL); its default is 30


def shorter_node_heartbeat(interval: float = NODE_HEARTBEAT_SECONDS) -> None:
    """Patch 6, for a deployed SuperNode's own process (`privet deploy supernode`): announce
    and send heartbeats every `interval` s instead of Flower's 30. The SuperLink keeps a node
    online for 2 intervals after its last heartbeat (HEARTBEAT_PATIENCE) and refuses to
    activate a node it still holds online ("Failed to activate SuperNode"): a node restarted
    after a crash is refused for up to 20 s instead of 60. Flower 1.41 has no flag for it;
    the SuperLink accepts 10-1800 s. Raises PatchError where the constants moved."""
    check_version("flwr", importlib.metadata.version("flwr"), WRITTEN_FOR)
    from flwr.supercore import heartbeat
    from flwr.supernode import fleet_http_connection

    modules = (heartbeat, fleet_http_connection)
    if any(not hasattr(m, "HEARTBEAT_DEFAULT_INTERVAL") for m in modules):
        raise PatchError("flwr's SuperNode heartbeat moved: update privet/patches/flower.py "
                         "for this Flower version")
    for module in modules:
        module.HEARTBEAT_DEFAULT_INTERVAL = interval
