"""Experiment tracking: a run logged to MLflow and/or TensorBoard besides its own directory.

Callbacks, as pfl-research does it: one small class per backend (`MlflowCallback`,
`TensorBoardCallback`) with three hooks, `on_run_start`, `on_round_end` and `on_run_end`,
which the run recorder (server.recorder) calls through `Tracking`. `Tracking` owns the
policy: a backend whose call fails is named in one warning line and not called again, the
run goes on, and summary.json → `tracking` says what each backend logged (`ok`, `error`).
The run directory stays the record; tracking copies it.

Nothing here imports MLflow or TensorBoard until a `[tracking]` key asks for it, and
`check` (the CLI's preflight) turns a missing library into one line naming the key and the
extra to install, before any client trains.

What goes where (README, Tracking):

- MLflow (`[tracking] mlflow = URI`): one run per privet run in the experiment
  `tracking.experiment` (default: the config's name), named after the run directory; params:
  the flattened config (`train.lr`, ...); metrics: rounds.csv's columns with step = round,
  and at the end the per-client ε as a summary (`client_epsilon/max`, `median`, `mean`, `min`,
  `count`; `clients/out_of_budget`, `clients/failed`); artifacts: the run's files and
  `epsilon_per_client.csv`; tags: `level`, `epsilon_target`, `seed`, `privet.run_id`,
  `privet.status`.
- TensorBoard (`[tracking] tensorboard = DIR`): the same scalars, written with
  tensorboard's own `tensorboard.summary.Writer` to DIR/<experiment>/<run directory's name>.

`sync_finished_run` logs a finished run from its files (what `privet compare` does for runs
it reuses, and for the audit it runs after a run): a run already in the experiment (tag
`privet.run_id`) is never logged twice.
"""

from __future__ import annotations

import csv
import importlib
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from privet.common import results
from privet.common.config import ConfigError, ExperimentConfig

log = logging.getLogger("flwr")

# [tracking] key -> (what to import, the library's name, the extra that installs it)
LIBRARIES = {"mlflow": ("mlflow.tracking", "MLflow", "mlflow"),
             "tensorboard": ("tensorboard.summary", "TensorBoard", "tensorboard")}
PER_CLIENT_CSV = "epsilon_per_client.csv"  # artifact: every client's final ε
RUN_ID_TAG = "privet.run_id"                # summary.json → run_id: one MLflow run per privet run
STATUS_TAG = "privet.status"
AUDIT_TAG = "audit_violation"              # set once the audit is logged
# privet's end states -> MLflow's (RunStatus names)
MLFLOW_STATUS = {"complete": "FINISHED", "complete-with-failures": "FINISHED",
                 "budget-exhausted": "FINISHED", "interrupted": "KILLED", "failed": "FAILED",
                 "paused": "KILLED"}  # a paused run resumes into the same MLflow run
# an unreachable server costs a few seconds, not MLflow's default ~4 minutes of retries per
# call (the user's own settings of these win)
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                        "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
PARAM_VALUE_LIMIT = 6000  # MLflow's longest param value (mlflow.utils.validation)
PARAMS_PER_BATCH = 100    # and most params per log_batch call


class TrackingUnavailable(ConfigError):
    """A `[tracking]` key names a backend whose library cannot be imported."""


def configured(cfg: ExperimentConfig) -> list[str]:
    """The `[tracking]` backends the config turns on ("mlflow", "tensorboard")."""
    return [key for key in LIBRARIES if getattr(cfg.tracking, key)]


def check(cfg: ExperimentConfig) -> None:
    """Import the libraries `[tracking]` asks for (once per process; later uses are free).
    Raises TrackingUnavailable, one line naming the key and the extra to install."""
    for key in configured(cfg):
        module, library, extra = LIBRARIES[key]
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - ImportError, or a broken install
            missing = isinstance(error, ImportError) and (
                getattr(error, "name", None) or "").split(".")[0] == module.split(".")[0]
            why = ("is not installed" if missing
                   else f"cannot be imported ({type(error).__name__}: {_one_line(error)})")
            raise TrackingUnavailable(
                f"tracking.{key}: {getattr(cfg.tracking, key)!r} needs {library}, which "
                f"{why}: pip install 'privet[{extra}]' (or set tracking.{key} = \"\")"
            ) from None


def experiment_name(cfg: ExperimentConfig) -> str:
    """The MLflow experiment (and TensorBoard subfolder) of a run: `tracking.experiment`,
    else the config's name."""
    return cfg.tracking.experiment or cfg.name


@dataclass(frozen=True)
class RunInfo:
    """What the backends know of a run when it starts."""
    cfg: ExperimentConfig
    run_dir: Path
    run_id: str     # privet's run id (summary.json → run_id)
    started: float  # epoch seconds: rounds.csv's elapsed_seconds count from here

    @property
    def name(self) -> str:
        return self.run_dir.name


class MlflowCallback:
    """Logs a run to MLflow through `MlflowClient` (no global active run, so it is safe in the
    ServerApp's thread): params at the start, metrics per round, artifacts at the end."""

    key = "mlflow"

    def __init__(self, uri: str, experiment: str) -> None:
        self.uri, self.experiment = uri, experiment
        self.run_id: str | None = None
        self.client = None
        if _local_store(uri):  # recent MLflow asks for this before it opens a ./mlruns store
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            if not uri.startswith("file:"):  # a folder: from where privet runs, said in full
                self.uri = str(Path(uri).expanduser().resolve())
        for name, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)

    def describe(self) -> dict[str, Any]:
        return {"uri": self.uri, "experiment": self.experiment, "run_id": self.run_id}

    def _client(self):
        if self.client is None:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
        return self.client

    def experiment_id(self, create: bool = True) -> str | None:
        """The experiment's id; created when missing (another process may create it at the
        same moment: `privet compare --jobs`)."""
        client = self._client()
        found = client.get_experiment_by_name(self.experiment)
        if found is not None or not create:
            return None if found is None else found.experiment_id
        try:
            return client.create_experiment(self.experiment)
        except Exception:  # noqa: BLE001 - created meanwhile by another run: use it
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                raise
            return found.experiment_id

    def find(self, privet_run_id: str) -> str | None:
        """The MLflow run that logged this privet run, if any."""
        experiment = self.experiment_id(create=False)
        if experiment is None or not privet_run_id:
            return None
        runs = self._client().search_runs(
            [experiment], filter_string=f"tags.`{RUN_ID_TAG}` = '{privet_run_id}'",
            max_results=1)
        return runs[0].info.run_id if runs else None

    def on_run_start(self, run: RunInfo) -> None:
        from mlflow.entities import Param

        client = self._client()
        resumed = self.find(run.run_id)  # a resumed privet run goes on in its MLflow run
        if resumed is not None:
            self.run_id = resumed
            client.update_run(resumed, status="RUNNING")
            return
        created = client.create_run(self.experiment_id(), run_name=run.name,
                                    start_time=int(run.started * 1000), tags=run_tags(run))
        self.run_id = created.info.run_id
        params = [Param(k, v) for k, v in params_of(run.cfg).items()]
        for i in range(0, len(params), PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=params[i:i + PARAMS_PER_BATCH])

    def on_round_end(self, server_round: int, values: dict[str, float], wall_time: float
                     ) -> None:
        from mlflow.entities import Metric

        stamp = int(wall_time * 1000)
        self._client().log_batch(self.run_id, metrics=[
            Metric(k, v, stamp, server_round) for k, v in values.items()])

    def on_run_end(self, status: str, run: RunInfo, final: dict[str, float], step: int,
                   per_client: Path | None) -> None:
        from mlflow.entities import Metric, RunTag

        client = self._client()
        stamp = int(time.time() * 1000)
        client.log_batch(self.run_id, metrics=[Metric(k, v, stamp, step)
                                               for k, v in final.items()],
                         tags=[RunTag(STATUS_TAG, status)])
        for path in run_files(run.run_dir):
            client.log_artifact(self.run_id, str(path))
        if per_client is not None:
            client.log_artifact(self.run_id, str(per_client))
        client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FINISHED"))

    def log_audit(self, run_dir: Path) -> bool:
        """Add a run's audit (audit.json, `privet audit`) to its MLflow run, once: metrics
        `audit/*`, tag `audit_violation`, the file as an artifact. False when the run is not in
        the experiment or was audited there already."""
        from mlflow.entities import Metric, RunTag

        summary = results.read_summary(run_dir)
        audit = results.read_audit(run_dir)
        run_id = self.find(str(summary.get("run_id") or ""))
        if audit is None or run_id is None:
            return False
        client = self._client()
        if AUDIT_TAG in client.get_run(run_id).data.tags:
            return False
        tpr = audit.get("tpr_at_fpr") or {}
        values = {"audit/auc": audit.get("auc"), "audit/tpr_at_fpr_1pct": tpr.get("0.01"),
                  "audit/tpr_at_fpr_0.1pct": tpr.get("0.001"),
                  "audit/epsilon_lower_bound": audit.get("epsilon_lower_bound")}
        stamp = int(time.time() * 1000)
        step = int(summary.get("rounds") or 0)
        client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, step)
                                          for k, v in values.items() if v is not None],
                         tags=[RunTag(AUDIT_TAG,
                                      str(bool(audit.get("violation"))).lower())])
        if not any(a.path == results.AUDIT for a in client.list_artifacts(run_id)):
            client.log_artifact(run_id, str(run_dir / results.AUDIT))
        return True


class TensorBoardCallback:
    """Writes the scalars of every round with tensorboard's own writer
    (`tensorboard.summary.Writer`: event files, no TensorFlow)."""

    key = "tensorboard"

    def __init__(self, folder: str, experiment: str) -> None:
        self.folder, self.experiment = folder, experiment
        self.path: Path | None = None
        self.writer = None

    def describe(self) -> dict[str, Any]:
        return {"dir": str(self.path) if self.path else self.folder,
                "experiment": self.experiment}

    def run_path(self, run: RunInfo) -> Path:
        """DIR/<experiment>/<run directory's name>: `tensorboard --logdir DIR` lists each run,
        grouped by experiment."""
        return (Path(self.folder).expanduser() / _folder_name(self.experiment)
                / _folder_name(run.name)).resolve()

    def on_run_start(self, run: RunInfo) -> None:
        from tensorboard.summary import Writer

        self.path = self.run_path(run)
        self.path.mkdir(parents=True, exist_ok=True)
        self.writer = Writer(str(self.path))

    def on_round_end(self, server_round: int, values: dict[str, float], wall_time: float
                     ) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, server_round, wall_time=wall_time)
        self.writer.flush()

    def on_run_end(self, status: str, run: RunInfo, final: dict[str, float], step: int,
                   per_client: Path | None) -> None:
        for tag, value in final.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.close()


Callback = MlflowCallback | TensorBoardCallback


def callbacks_for(cfg: ExperimentConfig) -> list[Callback]:
    """The backends `[tracking]` turns on (their libraries are imported when first used)."""
    found: list[Callback] = []
    if cfg.tracking.mlflow:
        found.append(MlflowCallback(cfg.tracking.mlflow, experiment_name(cfg)))
    if cfg.tracking.tensorboard:
        found.append(TensorBoardCallback(cfg.tracking.tensorboard, experiment_name(cfg)))
    return found


class Tracking:
    """The tracking callbacks of one run, and what became of each (`summary()`).

    Every call is guarded: a backend that raises (an unreachable server, a full disk) is
    named in one warning line and left alone for the rest of the run; the run goes on.
    Thread-safe: the ServerApp's thread logs rounds while the CLI may end the run
    (`end_open`, on Ctrl-C)."""

    def __init__(self, callbacks: list[Callback], warn: Callable[[str], None] | None = None
                 ) -> None:
        self.callbacks = callbacks
        self.warn = warn or _warn
        self.state = {cb.key: {"ok": True, "error": None} for cb in callbacks}
        self.run: RunInfo | None = None
        self.ended = False
        self._lock = threading.Lock()

    @classmethod
    def for_run(cls, cfg: ExperimentConfig, run_dir: Path, run_id: str,
                started: float | None = None) -> "Tracking":
        """Start tracking a run (nothing when `[tracking]` is empty). Raises
        TrackingUnavailable when a library is missing (a deployed ServerApp: privet simulate
        and compare have said so before any client trained)."""
        tracking = cls(callbacks_for(cfg))
        if tracking.callbacks:
            check(cfg)
            tracking.start(RunInfo(cfg, Path(run_dir), run_id,
                                   time.time() if started is None else started))
            with _OPEN_LOCK:
                _OPEN[Path(run_dir).resolve()] = tracking
        return tracking

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def _call(self, cb: Callback, stage: str, fn: Callable[[], None]) -> None:
        state = self.state[cb.key]
        if not state["ok"]:
            return
        try:
            fn()
        except Exception as error:  # noqa: BLE001 - tracking never ends a run
            state.update(ok=False, error=f"{stage}: {type(error).__name__}: "
                                         f"{_one_line(error)}"[:500])
            where = cb.describe().get("uri") or cb.describe().get("dir")
            self.warn(f"tracking.{cb.key} ({where}) failed at {stage}, no more is logged "
                      f"there; the run goes on and its directory holds every result: "
                      f"{type(error).__name__}: {_one_line(error)[:300]}")

    def start(self, run: RunInfo) -> None:
        """Run start: create the run (MLflow: params and tags; TensorBoard: its folder)."""
        self.run = run
        with self._lock:
            for cb in self.callbacks:
                self._call(cb, "the run's start", lambda cb=cb: cb.on_run_start(run))

    def round_end(self, server_round: int, row: dict[str, Any]) -> None:
        """A round's row of rounds.csv, logged with step = round."""
        if not self.callbacks:
            return
        values = round_metrics(row)
        wall_time = self.run.started + float(row.get("elapsed_seconds") or 0.0)
        with self._lock:
            if self.ended:
                return
            for cb in self.callbacks:
                self._call(cb, f"round {server_round}",
                           lambda cb=cb: cb.on_round_end(server_round, values, wall_time))

    def end(self, status: str) -> bool:
        """Run end: per-client ε (a summary and a CSV), the run's files, the final status.
        Reads summary.json, so call it after writing that. False when there was nothing to
        do (no tracking, or ended already)."""
        with self._lock:
            if not self.callbacks or self.ended:
                return False
            self.ended = True
            with _OPEN_LOCK:
                _OPEN.pop(self.run.run_dir.resolve(), None)
            try:
                summary = results.read_summary(self.run.run_dir)
            except (OSError, ValueError):
                summary = {}
            final = final_metrics(summary)
            step = int(summary.get("rounds") or 0)
            with tempfile.TemporaryDirectory(prefix="privet-tracking-") as tmp:
                per_client = write_per_client(summary, Path(tmp) / PER_CLIENT_CSV)
                for cb in self.callbacks:
                    self._call(cb, "the run's end", lambda cb=cb: cb.on_run_end(
                        status, self.run, final, step, per_client))
            return True

    def summary(self) -> dict[str, Any] | None:
        """summary.json → tracking: per backend where it logged and whether all of it went
        (`ok`; `error`: the first failure); None without tracking."""
        if not self.callbacks:
            return None
        return {cb.key: {**cb.describe(), **self.state[cb.key]} for cb in self.callbacks}


# Runs of this process still being tracked, by run directory: the CLI ends them when it
# stops a run the ServerApp's thread cannot finish (Ctrl-C, SIGTERM, a failure).
_OPEN: dict[Path, Tracking] = {}
_OPEN_LOCK = threading.Lock()


def end_open(run_dir: Path, status: str) -> None:
    """End the tracking of the run in `run_dir`, if this process still tracks it: MLflow's
    run is marked KILLED (interrupted) or FAILED, with the files written so far."""
    with _OPEN_LOCK:
        tracking = _OPEN.get(Path(run_dir).resolve())
    if tracking is not None:
        tracking.end(status)


# --- what is logged -----------------------------------------------------------------------

def params_of(cfg: ExperimentConfig) -> dict[str, str]:
    """The flattened config as MLflow params ("train.lr" -> "0.2"); `tracking.*` (where it
    is logged, not what ran) and `drift.*` of a run without drift mode left out; a value
    past MLflow's limit is cut and says so (the whole config is in the config.toml
    artifact)."""
    params = {}
    for key, value in cfg.to_run_config().items():
        if key.startswith("tracking.") or (key.startswith("drift.") and not cfg.drift.source):
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else (
            "inf" if isinstance(value, float) and math.isinf(value) else str(value))
        if len(text) > PARAM_VALUE_LIMIT:
            note = f" … ({len(text)} characters; see config.toml)"
            text = text[:PARAM_VALUE_LIMIT - len(note)] + note
        params[key] = text
    return params


def run_tags(run: RunInfo) -> dict[str, str]:
    """Level, target ε and seed, as `privet compare` names a grid point, and privet's ids."""
    from privet.experiments.report import identity  # matplotlib is imported only when used

    level, target = identity(run.cfg)
    return {"level": level, "epsilon_target": f"{target:g}", "seed": str(run.cfg.seed),
            RUN_ID_TAG: run.run_id, STATUS_TAG: "running",
            "privet.run_dir": str(run.run_dir.resolve()), "mlflow.source.name": "privet"}


def round_metrics(row: dict[str, Any]) -> dict[str, float]:
    """A rounds.csv row as metrics: every column but `round`, by its own name; empty cells
    (no AUC, no user level) left out."""
    values = {}
    for key, value in row.items():
        if key == "round" or value in (None, ""):
            continue
        try:
            values[key] = float(value)
        except (TypeError, ValueError):
            continue
    return values


def final_metrics(summary: dict) -> dict[str, float]:
    """The clients' final sample-level ε in a few numbers (readable at 100,000 clients; each
    client's is in epsilon_per_client.csv)."""
    clients = ((summary.get("privacy") or {}).get("clients") or {}).values()
    spent = [c["epsilon"] for c in clients
             if isinstance(c.get("epsilon"), (int, float)) and math.isfinite(c["epsilon"])]
    out: dict[str, float] = {}
    if spent:
        out.update({"client_epsilon/max": max(spent), "client_epsilon/min": min(spent),
                    "client_epsilon/mean": statistics.fmean(spent),
                    "client_epsilon/median": statistics.median(spent),
                    "client_epsilon/count": float(len(spent))})
    clients = list(clients)
    if clients:
        out["clients/out_of_budget"] = float(sum(c.get("stopped_round") is not None
                                                 for c in clients))
        out["clients/failed"] = float(sum(c.get("left_out") == "failed" for c in clients))
    return out


PER_CLIENT_COLUMNS = ["client", "epsilon", "target_epsilon", "earlier_runs_epsilon",
                      "rounds_trained", "stopped_round", "left_out"]


def write_per_client(summary: dict, path: Path) -> Path | None:
    """Every client's final ε (summary.json → privacy.clients) as a CSV; None for none."""
    clients = (summary.get("privacy") or {}).get("clients") or {}
    if not clients:
        return None
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=PER_CLIENT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for cid, c in clients.items():
            writer.writerow({"client": cid, **{k: "" if c.get(k) is None else c[k]
                                               for k in PER_CLIENT_COLUMNS[1:]}})
    return path


def run_files(run_dir: Path) -> list[Path]:
    """The run's own files (results.RUN_FILES) that exist: what MLflow keeps as artifacts
    (not the checkpoint, which only --resume reads)."""
    return [run_dir / name for name in results.RUN_FILES
            if name != results.CHECKPOINT and (run_dir / name).is_file()]


# --- a finished run, from its files (privet compare) --------------------------------------

def sync_finished_run(run_dir: Path, where: ExperimentConfig | None = None) -> list[str]:
    """Make sure a finished run is tracked, from its files, where `where`'s `[tracking]` says
    (privet compare's config now; default: the run's own): a run its own ServerApp did not
    log there (tracking added or moved on a resumed sweep, or it failed) is logged now, and
    its audit added. Never twice: MLflow is asked for the run's id (tag privet.run_id),
    TensorBoard's run folder for event files. Returns warning lines (nothing raises)."""
    import dataclasses

    from privet.common.config import load_config

    run_dir = Path(run_dir)
    warnings: list[str] = []
    try:
        cfg = load_config(run_dir / results.CONFIG)
        if where is not None:
            cfg = dataclasses.replace(cfg, tracking=where.tracking)
        summary = results.read_summary(run_dir)
        rows = results.read_csv(run_dir / results.ROUNDS)
    except (OSError, ValueError) as error:
        return [f"tracking: cannot read {run_dir}: {_one_line(error)}"]
    callbacks = callbacks_for(cfg)
    if not callbacks:
        return []
    try:
        check(cfg)
    except TrackingUnavailable as error:
        return [str(error)]
    status = str(summary.get("status") or "complete")
    for cb in callbacks:
        try:
            if isinstance(cb, MlflowCallback):
                if cb.find(str(summary.get("run_id") or "")) is None:
                    _replay(cb, cfg, run_dir, summary, rows, status)
                cb.log_audit(run_dir)
            elif not any(cb.run_path(_info(cfg, run_dir, summary, rows)).glob("events.*")):
                _replay(cb, cfg, run_dir, summary, rows, status)
        except Exception as error:  # noqa: BLE001 - tracking never fails a comparison
            where = cb.describe().get("uri") or cb.folder
            warnings.append(f"tracking.{cb.key} ({where}): could not log {run_dir.name}: "
                            f"{type(error).__name__}: {_one_line(error)[:300]}")
    return warnings


def _info(cfg: ExperimentConfig, run_dir: Path, summary: dict, rows: list[dict]) -> RunInfo:
    """A finished run as the backends saw it start: its clock from rounds.csv's last write."""
    try:
        last = float(rows[-1]["elapsed_seconds"]) if rows else 0.0
        started = (run_dir / results.ROUNDS).stat().st_mtime - last
    except (OSError, ValueError, KeyError):
        started = time.time() - float(summary.get("wall_seconds") or 0.0)
    return RunInfo(cfg, run_dir, str(summary.get("run_id") or ""), started)


def _replay(cb: Callback, cfg: ExperimentConfig, run_dir: Path, summary: dict,
            rows: list[dict], status: str) -> None:
    """A finished run through a callback's three hooks, as if it were running."""
    run = _info(cfg, run_dir, summary, rows)
    cb.on_run_start(run)
    for row in rows:
        cb.on_round_end(int(row["round"]), round_metrics(row),
                        run.started + float(row.get("elapsed_seconds") or 0.0))
    with tempfile.TemporaryDirectory(prefix="privet-tracking-") as tmp:
        cb.on_run_end(status, run, final_metrics(summary), int(summary.get("rounds") or 0),
                      write_per_client(summary, Path(tmp) / PER_CLIENT_CSV))


# --- helpers ------------------------------------------------------------------------------

def _local_store(uri: str) -> bool:
    """A folder (./mlruns, /abs/mlruns) or file: URI: MLflow's file store."""
    return uri.startswith("file:") or not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", uri)


def _folder_name(name: str) -> str:
    """A name as one folder: path separators and other odd characters become `_`."""
    cleaned = re.sub(r"[^\w.=+-]+", "_", name).strip(".") or "_"
    return cleaned


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _warn(line: str) -> None:
    """One warning line: in the Flower log where it is shown (deployment, `privet simulate
    -v`), else on stderr (`privet simulate` keeps Flower's log to errors)."""
    if log.isEnabledFor(logging.WARNING):
        log.warning("privet: warning: %s", line)
    else:
        print(f"privet: warning: {line}", file=sys.stderr, flush=True)
