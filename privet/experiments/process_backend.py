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
Ray, over one pipe per worker: an engine thread takes an idle worker, sends, and waits for
the reply on that pipe (concurrent.futures' pool, used before, passed each message through
two queues and two extra threads: ~1.5 ms a message, more than a small client trains). A
worker that dies (killed, out of memory) fails its message and is replaced. `--ray-address`
(a real cluster) still uses Ray.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import multiprocessing
import multiprocessing.forkserver
import os
import queue
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
        self._idle: queue.Queue | None = None  # pipes to the workers not running a message
        self._processes: dict[int, multiprocessing.process.BaseProcess] = {}  # by pipe id
        self._busy = 0
        self._lock = threading.Lock()
        self._stopped = False  # terminated: no message runs, no worker is replaced

    def _spawn(self):
        """A worker forked from the fork server (which imported the ClientApp), loaded and
        ready; returns the pipe to it. Raises RuntimeError if it cannot load the app."""
        context = multiprocessing.get_context("forkserver")
        ours, theirs = context.Pipe()
        process = context.Process(target=pool_worker.serve,
                                  args=(theirs, self.reference, os.getpid()),
                                  name="privet-pool-worker")
        process.start()
        theirs.close()
        try:
            ready = ours.recv()
        except (EOFError, OSError):
            ready = "the worker process ended before it loaded the ClientApp"
        if ready is not None:
            process.kill()
            raise RuntimeError(f"a pool worker could not start: {ready}")
        self._processes[id(ours)] = process
        return ours

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        # the fork server imports the ClientApp once; every worker is a fork of it
        start_fork_server(self.reference)
        self._idle = queue.Queue()
        for _ in range(self.workers):  # every worker now (each loads the app), not later
            self._idle.put(self._spawn())
        # Flower terminates its backend when the run ends; should this process end another
        # way, stop the workers before multiprocessing joins them at exit
        atexit.register(self.terminate)
        plots.EXECUTOR = self  # the run's plot is drawn by a worker (pyplot imported)

    @property
    def num_workers(self) -> int:
        return self.workers

    def is_worker_idle(self) -> bool:
        with self._lock:
            return self._busy < self.workers

    def terminate(self) -> None:
        if plots.EXECUTOR is self:
            plots.EXECUTOR = None
        atexit.unregister(self.terminate)
        self._stopped = True
        if self._idle is None:
            return
        pipes = []
        while True:
            try:
                pipes.append(self._idle.get_nowait())
            except queue.Empty:
                break
        for pipe in pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for pipe in pipes:
            process = self._processes.pop(id(pipe), None)
            if process is not None:
                process.join(5)
                if process.is_alive():
                    process.kill()
                    process.join()
            pipe.close()
        for process in self._processes.values():  # busy ones (an engine thread still waits)
            process.kill()

    def _call(self, request: tuple):
        """Send `request` to an idle worker and return its answer; a worker that dies
        meanwhile is replaced and the request fails with RuntimeError."""
        if self._idle is None:
            raise RuntimeError("the process pool is not running")
        idle = self._idle
        while True:  # an idle worker, unless the pool stops meanwhile
            if self._stopped:
                raise RuntimeError("the process pool has stopped (the run is ending)")
            try:
                pipe = idle.get(timeout=0.1)
                break
            except queue.Empty:
                continue
        with self._lock:
            self._busy += 1
        try:
            pipe.send(request)
            answer = pipe.recv()
        except (EOFError, OSError) as error:
            process = self._processes.pop(id(pipe), None)
            if process is not None:
                process.join(1)
            code = process.exitcode if process is not None else None
            pipe.close()
            pipe = None
            if not self._stopped:  # a replacement (if that fails: one worker fewer)
                pipe = self._spawn()
            raise RuntimeError(f"the pool worker running it ended (exit code {code}): "
                               f"{type(error).__name__}") from None
        finally:
            with self._lock:
                self._busy -= 1
            if pipe is not None:
                idle.put(pipe)
        return answer

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        try:
            reply, context, error = self._call(("run", message, context))
        except RuntimeError as error:
            raise ClientAppException(str(error)) from None
        if error is not None:
            raise ClientAppException(error)
        return reply, context

    def submit(self, function: Callable, *args) -> concurrent.futures.Future:
        """Run `function(*args)` (picklable) in a worker; a Future of its result or of the
        exception it raised (a RuntimeError of its text if it does not pickle). Raises RuntimeError, as an Executor shut down
        does, when the pool cannot run it (stopped, or the worker died): common.plots.draw
        then draws here."""
        ok, value = self._call(("call", function, args))
        future: concurrent.futures.Future = concurrent.futures.Future()
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value if isinstance(value, BaseException)
                                 else RuntimeError(value))
        return future
