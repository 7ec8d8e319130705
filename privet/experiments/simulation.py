"""Run an experiment on Flower's simulation runtime (Ray), in this process.

This does what `flwr-simulation` does when a SuperLink hands it a run: build a `Run`
whose override config is our flat config, and call Flower's simulation entry point
with the app's `serverapp`/`clientapp` components. `flwr.simulation.run_simulation`
is not used: it is deprecated and passes an empty run_config.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

from privet.common.config import PROJECT_DIR, ExperimentConfig
from privet.experiments.lifetime import stop_signals

SERVER_APP = "privet.server.app:app"
CLIENT_APP = "privet.clients.app:app"


# On one machine the clients run in privet's process pool (experiments/process_backend.py);
# "ray" runs them on a Ray of the run's own instead, as `--ray-address` does on a cluster
BACKEND_ENV = "PRIVET_BACKEND"
CPUS_ENV = "PRIVET_CPUS"  # caps the cores; `privet compare --jobs N` splits the machine with it


def simulation_cpus() -> int:
    """Cores Ray may use; each ClientApp actor takes one and runs one torch thread."""
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        cores = max(1, os.cpu_count() or 1)
    limit = os.environ.get(CPUS_ENV, "").strip()
    return max(1, min(cores, int(limit))) if limit.isdigit() else cores


RAY_ADDRESS_EXPECTED = ("HOST:PORT of a running Ray cluster's head node (what `ray start --head` "
                        "prints, e.g. 127.0.0.1:6379), or auto for the cluster `ray start` "
                        "started on this machine")


class RayAddressError(ValueError):
    """`--ray-address` is malformed, or no Ray cluster answers there."""


def check_ray_address(address: str) -> str:
    """`address` stripped, if it has the shape of a Ray cluster address: `auto` or HOST:PORT."""
    address = address.strip()
    if address == "auto":
        return address
    if "://" in address:  # ray://: Ray Client, whose driver runs off the cluster
        raise RayAddressError(f"--ray-address {address!r}: expected {RAY_ADDRESS_EXPECTED}, "
                              "without a scheme; run privet on a machine of the cluster")
    host, _, port = address.rpartition(":")
    if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise RayAddressError(f"--ray-address {address!r}: expected {RAY_ADDRESS_EXPECTED}")
    return address


def backend_config(num_cpus: int, ray_address: str | None = None, num_gpus: float = 0.0
                   ) -> dict:
    """Flower's Ray backend config. Without `ray_address` Ray starts here with `num_cpus`;
    with it, Ray joins that cluster and uses its CPUs. Each ClientApp actor takes one CPU
    either way (and runs one torch thread, see clients/app.py) and `num_gpus` of a GPU
    (Flower's `client-resources.num-gpus`: 0.25 = four actors on one GPU; 0 = none, on the
    CPU; see common.device.client_gpus)."""
    init_args: dict = {"num_cpus": num_cpus, "logging_level": "ERROR",
                       "log_to_driver": False, "include_dashboard": False,
                       # a local Ray of our own, even if RAY_ADDRESS is set or `ray start`
                       # left a cluster address in /tmp/ray: never join a cluster unasked
                       "address": "local"}
    if ray_address:
        init_args = {"address": ray_address, "logging_level": "ERROR", "log_to_driver": False}
    return {"client_resources": {"num_cpus": 1, "num_gpus": float(num_gpus)},
            "init_args": init_args}


def import_client_app() -> None:
    """Ray's worker_process_setup_hook: each worker imports the ClientApp (torch, pandas,
    dp-accounting, Flower: ~3 s) as soon as Ray starts it, while the ServerApp is still
    starting, instead of when its first message arrives."""
    importlib.import_module(CLIENT_APP.split(":")[0])


def worker_runtime_env() -> dict:
    """What Flower's RayBackend gives Ray's workers (PYTHONPATH = this process's sys.path),
    the torch thread count (workers on other nodes do not inherit this environment) and
    the early import of the ClientApp."""
    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    return {"env_vars": {"PYTHONPATH": pythonpath,
                         "PRIVET_TORCH_THREADS": os.environ.get("PRIVET_TORCH_THREADS", "1")},
            "worker_process_setup_hook": f"{__name__}.import_client_app"}


def _start_local_ray(init_args: dict) -> None:
    """Start this run's own Ray before Flower's RayBackend would (it then skips ray.init),
    so that its workers import the ClientApp from the start (worker_runtime_env)."""
    import ray

    os.environ["PYTHONPATH"] = worker_runtime_env()["env_vars"]["PYTHONPATH"]  # as Flower does
    ray.init(runtime_env=worker_runtime_env(), **init_args)


def _join_cluster(init_args: dict) -> None:
    """Connect this process to the user's Ray cluster, before Flower's RayBackend would.

    Flower's `RayBackend.init_ray` skips `ray.init` when Ray is already initialised, so this
    is the one connection; doing it here turns a wrong address into one clear error (Ray
    itself retries an unreachable address for minutes, and Flower logs its traceback).
    The runtime env (worker_runtime_env) gives actors on any node this process's sys.path,
    so they import `clients.app` and friends from the same paths (the project, installed in
    the same virtualenv at the same place on every node)."""
    import ray
    from ray._common.utils import get_ray_address_file
    from ray._private.services import canonicalize_bootstrap_address, find_bootstrap_address

    address = init_args["address"]
    # auto: RAY_ADDRESS, else the cluster `ray start` last started here; unlike Ray's own
    # "auto", never any Ray it finds running (another privet run's private one)
    target = (os.environ.get("RAY_ADDRESS", "").strip() or find_bootstrap_address(None)
              if address == "auto" else address)
    if not target:
        raise RayAddressError(
            f"--ray-address auto: `ray start` recorded no cluster address on this machine "
            f"({get_ray_address_file(None)}) and RAY_ADDRESS is not set. Expected "
            f"{RAY_ADDRESS_EXPECTED}.")
    try:
        resolved = canonicalize_bootstrap_address(check_ray_address(target))
        host, _, port = resolved.rpartition(":")
        # Ray would retry a closed port for minutes: knock first
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except (OSError, ValueError, AttributeError) as error:
        raise RayAddressError(
            f"--ray-address {address}: no Ray cluster answers at {target} ({error}). "
            f"Expected {RAY_ADDRESS_EXPECTED}.") from None
    try:
        ray.init(runtime_env=worker_runtime_env(), include_dashboard=False,
                 **{**init_args, "address": resolved})
    except Exception as error:  # noqa: BLE001 - a version mismatch, auth, ...: say where
        raise RayAddressError(
            f"--ray-address {address}: could not join the Ray cluster at {resolved}: "
            f"{error} (privet runs Ray {ray.__version__}, Python "
            f"{sys.version_info.major}.{sys.version_info.minor}; the cluster must too)"
        ) from None


@contextmanager
def _ray_stopped_on_exit():
    """Shut Ray down however we leave (normal end, error, Ctrl-C). On a cluster this process
    only disconnects: the cluster keeps running, and Ray removes this run's actors."""
    try:
        yield
    finally:
        try:
            ray = sys.modules.get("ray")  # not imported: not started (the process pool)
            if ray is not None and ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - best effort cleanup
            pass


def preflight(cfg: ExperimentConfig) -> tuple[list[dict], tuple[str, ...]]:
    """Fail before Ray starts if the data cannot be read or split as configured; return
    the partition report (rows, label balance, missing cells per client) and what reading
    the files skipped or will clean (skipped lines, non-numeric cells)."""
    from privet.common.config import PROJECT_DIR

    if not (PROJECT_DIR / "pyproject.toml").is_file():  # a wheel, not the project folder
        raise ValueError(f"{PROJECT_DIR} holds no pyproject.toml: privet simulates its Flower "
                         "App from the project folder; clone it and `pip install -e .` "
                         "(a plain `pip install` gives `import privet` only)")
    from privet.server.tracking import check as check_tracking

    check_tracking(cfg)  # [tracking]'s libraries: one line naming the key and the extra
    from privet.common.config import is_import_path
    from privet.common.data.datasets import (model_input_shape, num_outputs, partition_report,
                                      planned_features, source_warnings, test_data)
    from privet.common.models import check_model

    if cfg.drift.source:  # windows from a generator or a time column: read the first
        from privet.common.drift import accounting as drift_accounting
        from privet.common.drift import streams

        drift_accounting.check(cfg)  # ConfigError: monitoring alone passes the target
        notes = tuple(check_model(cfg.train, (len(streams.feature_names(cfg)),),
                                  streams.num_classes(cfg), None, dp_sgd=cfg.private))
        streams.check(cfg)
        return [], notes + tuple(_drift_notes(cfg, streams))
    if cfg.regression and not cfg.data.tabular:
        from privet.common.config import ConfigError

        raise ConfigError(f"train.task = \"regression\" with data.dataset = "
                          f"\"{cfg.data.dataset}\": refused: its loader returned arrays, not a "
                          "DataFrame; regression needs a table with a numeric data.label")
    report = partition_report(cfg)
    if not cfg.federated_preprocessing:
        test_data(cfg)
    # the model, before Ray starts: a layer DP-SGD cannot train is one line (ModelError)
    features = planned_features(cfg)
    shape = (len(features),) if features is not None else model_input_shape(cfg)
    notes = tuple(check_model(cfg.train, shape, num_outputs(cfg), features,
                              dp_sgd=cfg.private))
    if is_import_path(cfg.strategy.name):  # a user's strategy: importable, a FedAvg, built
        from privet.common.config import ConfigError
        from privet.common.imports import one_line
        from privet.server.strategies import options, strategy_class

        chosen = strategy_class(cfg.strategy.name)  # ConfigError: one line
        try:
            chosen(fraction_train=1.0, clients_per_round=cfg.clients_per_round, seed=cfg.seed,
                   fraction_evaluate=0.0, min_available_nodes=1, **options(cfg))
        except Exception as error:  # noqa: BLE001 - the user's __init__, named
            raise ConfigError(f"strategy.name = {cfg.strategy.name!r}: building it with "
                              "FedAvg's keyword arguments failed: "
                              f"{type(error).__name__}: {one_line(error)[:300]}"
                              ) from None
    if cfg.train.dp_path == "one-pass":  # asked for by name: a model it cannot train stops here
        from privet.clients.bookkeeping import unsupported
        from privet.common.models import ModelError, build_model

        refused = unsupported(build_model(cfg.train, shape, num_outputs(cfg), features))
        if refused:
            raise ModelError(f"train.dp-path = \"one-pass\" cannot train train.model = "
                             f"{cfg.train.model!r}: {refused}; use \"auto\", \"hooks\" or "
                             "\"ghost\"")
    if cfg.data.tabular:
        small = [r["client"] for r in report if r["rows"] < cfg.train.batch_size]
        if len(small) == cfg.num_clients:
            raise ValueError(f"every client has fewer rows than train.batch-size = "
                             f"{cfg.train.batch_size}")
        able = cfg.num_clients - len(small)
        if 2 * len(small) > cfg.num_clients or able < cfg.clients_per_round:
            notes += (f"{len(small)} of {cfg.num_clients} clients have fewer rows than "
                     f"train.batch-size = {cfg.train.batch_size} and will never train"
                     + (f"; only {able} can, fewer than clients-per-round = "
                        f"{cfg.clients_per_round}" if able < cfg.clients_per_round else "")
                     + "; lower train.batch-size or num-clients",)
    p = cfg.privacy
    if p.ledger_dir:  # a ledger that cannot be trusted stops the run here, in one line
        from privet.common.privacy.ledger import LedgerDir

        for part in ("", "user-level"):
            LedgerDir(p.ledger_dir, part=part).records()
    if cfg.user_level and p.user_clipping == "adaptive":
        from privet.common.privacy.accountants import calibrate_noise
        from privet.server.user_dp import adaptive_noise

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
    return report, source_warnings(cfg) + notes


def start_early(ray_address: str | None = None) -> None:
    """Before the checks and imports of a run: start the process pool's fork server, which
    imports the ClientApp meanwhile (on one machine; Ray's workers do this themselves)."""
    os.environ.setdefault("PRIVET_TORCH_THREADS", "1")  # inherited by the pool's workers
    from privet.patches import stock

    if not ray_address and os.environ.get(BACKEND_ENV, "processes") != "ray" and not stock():
        from privet.experiments import process_backend

        process_backend.start_fork_server(CLIENT_APP)


def run(cfg: ExperimentConfig, run_dir: Path, *, verbose: bool = False,
        ray_address: str | None = None, resume: bool = False, pause_after: int = 0
        ) -> None:
    """Run `cfg` through Flower's simulation runtime; results land in `run_dir`. `resume`:
    go on from the checkpoint in `run_dir` (server.checkpoint); `pause_after`: stop after
    that round, leaving a checkpoint to resume from (0: never).

    The ClientApps run in a pool of local worker processes, one per core (at most one per
    client of a round). With `ray_address` (HOST:PORT or auto) they run as actors on that Ray
    cluster, one per CPU it has; a bad address raises RayAddressError."""
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

    from privet import patches
    from privet.experiments import process_backend
    from privet.patches import flower as flower_patches

    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.DEBUG if verbose else logging.ERROR)
    # Flower has its own handler; Opacus adds a root one on import (basicConfig), so
    # propagating would print every line twice.
    flwr_logger.propagate = False
    overrides = {**cfg.to_run_config(), "out-dir": str(run_dir), "resume": resume,
                 "pause-after": pause_after}
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
    from privet.common.device import client_gpus, clients_per_gpu, cluster_gpus, local_gpus

    workers = min(simulation_cpus(), cfg.clients_per_round)
    patches.install()  # nothing on stock libraries, whose only backend is Ray
    on_ray = (bool(ray_address) or os.environ.get(BACKEND_ENV, "processes") == "ray"
              or patches.stock())
    # each client's share of a GPU (0: the CPU); on a cluster, known once joined (below)
    share = 0.0 if ray_address else client_gpus(
        cfg.train.num_gpus, local_gpus(cfg.train.device, on_ray), workers)
    if not on_ray:  # the pool's workers share one GPU: no more of them than fit on it
        workers = min(workers, clients_per_gpu(share))
    config = backend_config(workers, check_ray_address(ray_address) if ray_address else None,
                            num_gpus=share)
    if not on_ray:
        config[process_backend.CONFIG_KEY] = {"workers": workers, "app": CLIENT_APP}
    from privet.server import recorder as run_recorder

    resolved = Path(run_dir).resolve()
    with (stop_signals("flwr", on_stop=lambda signum: run_recorder.stopping(resolved)),
          _ray_stopped_on_exit(),
          nullcontext() if on_ray else flower_patches.process_pool_backend(
              process_backend.ProcessPoolBackend)):
        if ray_address:
            _join_cluster(config["init_args"])
            import ray

            resources = ray.cluster_resources()
            config["client_resources"]["num_gpus"] = client_gpus(
                cfg.train.num_gpus, cluster_gpus(cfg.train.device, resources),
                max(1, int(resources.get("CPU", 1))))
        elif on_ray:
            _start_local_ray(config["init_args"])
        _run_simulation(
            server_app_attr=SERVER_APP, client_app_attr=CLIENT_APP,
            num_supernodes=cfg.num_clients, backend_name="ray",
            backend_config=config,
            app_dir=str(PROJECT_DIR), run=flower_run, server_app_context=context,
            is_app=True, verbose_logging=verbose,
            exit_event=EventType.FLWR_SIMULATION_RUN_LEAVE)


def _drift_notes(cfg: ExperimentConfig, streams) -> list[str]:
    """Warnings before a drift run: a file whose windows the rounds do not all reach."""
    if cfg.drift.source not in ("csv", "parquet"):
        return []
    from privet.common.drift import tables

    found, used = tables.windows_in_data(cfg), streams.num_windows(cfg)
    if found > used:
        return [f"{cfg.data.path} spans {found} windows of drift.window-length = "
                f"{cfg.drift.window_length!r}; rounds = {cfg.rounds} with "
                f"drift.rounds-per-window = {cfg.drift.rounds_per_window} use the first {used}"]
    if found < used:
        return [f"{cfg.data.path} spans {found} windows of drift.window-length = "
                f"{cfg.drift.window_length!r}; rounds {found * cfg.drift.rounds_per_window + 1}"
                f"-{cfg.rounds} have no rows"]
    return []
