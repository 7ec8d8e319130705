"""Run an experiment on Flower's simulation runtime (Ray), in this process.

This does what `flwr-simulation` does when a SuperLink hands it a run: build a `Run`
whose override config is our flat config, and call Flower's simulation entry point
with the app's `serverapp`/`clientapp` components. `flwr.simulation.run_simulation`
is not used: it is deprecated and passes an empty run_config.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path

from common.config import PROJECT_DIR, ExperimentConfig

SERVER_APP = "server.app:app"
CLIENT_APP = "clients.app:app"


CPUS_ENV = "PRIVET_CPUS"  # caps the cores; `privet compare --jobs N` splits the machine with it


def simulation_cpus() -> int:
    """Cores Ray may use; each ClientApp actor takes one and runs one torch thread."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cores = max(1, os.cpu_count() or 1)
    limit = os.environ.get(CPUS_ENV, "").strip()
    return max(1, min(cores, int(limit))) if limit.isdigit() else cores


def backend_config(num_cpus: int, ray_address: str | None = None) -> dict:
    init_args: dict = {"num_cpus": num_cpus, "logging_level": "ERROR",
                       "log_to_driver": False, "include_dashboard": False}
    if ray_address:
        init_args = {"address": ray_address, "logging_level": "ERROR", "log_to_driver": False}
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": init_args}


@contextmanager
def _quiet_on_interrupt():
    """On Ctrl-C the terminal signals Ray's actors too; Flower then logs each dead actor
    with a traceback. The user asked to stop: mute Flower first, then interrupt."""
    def on_sigint(signum, frame):
        logging.getLogger("flwr").setLevel(logging.CRITICAL + 1)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def _ray_stopped_on_exit():
    """Shut Ray down however we leave (normal end, error, Ctrl-C)."""
    try:
        yield
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass


def preflight(cfg: ExperimentConfig) -> tuple[list[dict], tuple[str, ...]]:
    """Fail before Ray starts if the data cannot be read or split as configured; return
    the partition report (rows, label balance, missing cells per client) and what reading
    the files skipped or will clean (skipped lines, non-numeric cells)."""
    from common.config import IMAGE_DATASETS
    from common.data import federated
    from common.data.datasets import partition_report, schema, source_warnings, test_data

    report = partition_report(cfg)
    if cfg.preprocess.fit == "federated":
        table = schema(cfg)
        for column in table.numeric:
            federated.bounds_of(table, column)
    else:
        test_data(cfg)
    if cfg.data.dataset not in IMAGE_DATASETS:
        small = [r["client"] for r in report if r["rows"] < cfg.train.batch_size]
        if len(small) == cfg.num_clients:
            raise ValueError(f"every client has fewer rows than train.batch-size = "
                             f"{cfg.train.batch_size}")
    p = cfg.privacy
    if cfg.user_level and p.user_clipping == "adaptive":
        from common.privacy.accountants import calibrate_noise
        from server.user_dp import adaptive_noise

        sigma = calibrate_noise(p.user_epsilon, p.delta, cfg.client_sample_rate, cfg.rounds,
                                p.accountant)
        expected = cfg.client_sample_rate * cfg.num_clients
        try:
            adaptive_noise(sigma, expected, p.user_count_stddev or None)
        except ValueError:
            raise ValueError(
                f"privacy.user-count-stddev = {p.user_count_stddev or expected / 20:g} is too "
                f"small for adaptive clipping at user-level σ = {sigma:.3f}: it must exceed "
                f"σ/2 = {sigma / 2:.3f}; raise it, or the cohort, or privacy.user-epsilon"
            ) from None
    return report, source_warnings(cfg)


def run(cfg: ExperimentConfig, run_dir: Path, *, verbose: bool = False) -> None:
    """Run `cfg` through Flower's simulation runtime; results land in `run_dir`."""
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("PRIVET_TORCH_THREADS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    # Flower has its own handler; Opacus adds a root one on import (basicConfig), so
    # propagating would print every line twice.
    flwr_logger.propagate = False
    overrides = {**cfg.to_run_config(), "out-dir": str(run_dir)}
    run_id = int.from_bytes(os.urandom(7), "big")
    flower_run = Run.create_empty(run_id=run_id)
    flower_run.override_config = overrides
    flower_run.primary_task_id = int.from_bytes(os.urandom(7), "big")
    flower_run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = flower_run.primary_task_id
    TaskIdentity.run_id = run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=get_fused_config_from_dir(PROJECT_DIR, overrides))
    with _quiet_on_interrupt(), _ray_stopped_on_exit():
        _run_simulation(
            server_app_attr=SERVER_APP, client_app_attr=CLIENT_APP,
            num_supernodes=cfg.num_clients, backend_name="ray",
            backend_config=backend_config(min(simulation_cpus(), cfg.clients_per_round)),
            app_dir=str(PROJECT_DIR), run=flower_run, server_app_context=context,
            is_app=True, verbose_logging=verbose,
            exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE)
