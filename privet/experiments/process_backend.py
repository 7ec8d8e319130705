"""A Flower simulation backend that runs ClientApps in a pool of local processes.

Flower's simulation runtime (its Virtual Client Engine) hands each message to a backend;
Flower 1.41 ships one, on Ray. On one machine Ray costs more than the clients: starting it
takes ~3 s, its helper processes (GCS, raylet, dashboard and runtime-env agents, log
monitor) burn ~5 s of CPU that a 2-core laptop's clients wanted, and stopping it ~1.5 s.
This backend keeps Flower's engine (its message routing, node contexts and threads) and
runs each message in a pool of worker processes instead: one per CPU, forked from a server
process that imported the ClientApp once, so a worker starts warm in milliseconds. Workers
live for the whole run and keep what the ClientApp caches between rounds (partitions,
noise calibrations), as Ray's actors do. Messages and contexts cross by pickling, as with
Ray. `--ray-address` (a real cluster) still uses Ray.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import multiprocessing.forkserver
import threading
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp.client_app import ClientApp, ClientAppException
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from privet.common import plots
from privet.experiments import pool_worker

# backend config: {"workers": N, "app": "module:attr"}; no "-" (Flower turns them into "_")
CONFIG_KEY = "privet_process_pool"

def start_fork_server(reference: str) -> None:
    """Start the fork server now, so that it imports the ClientApp while this process is
    still starting the ServerApp (the pool's workers are forked from it later)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([reference.partition(":")[0], pool_worker.__name__,
                                    "privet.experiments.pool_warm"])
    multiprocessing.forkserver.ensure_running()


class ProcessPoolBackend(Backend):
    """Flower Backend: one warm worker process per CPU, messages run in any idle one."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        config = backend_config.get(CONFIG_KEY)
        if not config:
            raise ValueError(f"backend config lacks {CONFIG_KEY!r}: {backend_config}")
        self.workers = int(config["workers"])
        self.reference = str(config["app"])
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._busy = 0
        self._lock = threading.Lock()

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        # the fork server imports the ClientApp once; every worker is a fork of it
        start_fork_server(self.reference)
        self.pool = concurrent.futures.ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("forkserver"),
            initializer=pool_worker.start, initargs=(os.getpid(),))
        # start every worker now (each loads the app), not at the first message
        for future in [self.pool.submit(pool_worker.load_app, self.reference)
                       for _ in range(self.workers)]:
            future.result()
        plots.EXECUTOR = self.pool  # the run's plot is drawn by a worker (pyplot imported)

    @property
    def num_workers(self) -> int:
        return self.workers

    def is_worker_idle(self) -> bool:
        with self._lock:
            return self._busy < self.workers

    def terminate(self) -> None:
        if plots.EXECUTOR is self.pool:
            plots.EXECUTOR = None
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if self.pool is None:
            raise RuntimeError("the process pool is not built")
        with self._lock:
            self._busy += 1
        try:
            reply, context, error = self.pool.submit(
                pool_worker.run, self.reference, message, context).result()
        finally:
            with self._lock:
                self._busy -= 1
        if error is not None:
            raise ClientAppException(error)
        return reply, context
