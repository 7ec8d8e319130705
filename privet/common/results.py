"""The run directory: what a run leaves behind, written atomically as it goes.

    config.toml    the resolved experiment config
    metrics.csv    one row per round and client (status, examples, loss, accuracy, ε so far)
    rounds.csv     one row per round (global test accuracy and loss, or RMSE, MAE, R² and
                   the baseline for regression; max ε, clients, time)
    summary.json   final (or latest) accuracy, ε per client with its history, wall time,
                   versions, seed, and `status`: running | complete | interrupted | failed
    model.pt       the latest global weights
    model.json     what the model takes and gives: input shape, classes, feature layout, the
                   transform rows are encoded with, the regression target's scale
    *.png          plots

Every file is rewritten whole through a temp file and a rename, so a run stopped at
any moment leaves the rounds it finished readable.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: the process's umask, which only a read that sets it can tell
CONFIG = "config.toml"
METRICS = "metrics.csv"
ROUNDS = "rounds.csv"
SUMMARY = "summary.json"
MODEL = "model.pt"
PLOT = "accuracy_epsilon.png"
PARTITIONS = "partitions.csv"    # per client: rows, label balance, missing cells
TRANSFORM = "transform.json"     # the shared transform of federated preprocessing
AUDIT = "audit.json"             # `privet audit`: the membership-inference audit
CLIENT_TRANSFORMS = "client_transforms.json"  # each client's own DP-fitted transform
MODEL_SPEC = "model.json"        # what model.pt takes and gives (common.saved_model)
CHECKPOINT = "checkpoint.pkl"  # server.checkpoint: what --resume continues from
LEDGERS = "ledgers"  # a simulation's own ledgers (folder; clients.accounting.RUN_LEDGERS)
RUN_FILES = (CONFIG, METRICS, ROUNDS, SUMMARY, MODEL, PLOT, PARTITIONS, TRANSFORM,
             CLIENT_TRANSFORMS, AUDIT, MODEL_SPEC, CHECKPOINT,
             LEDGERS)  # what a run writes: replaced by the next

METRIC_COLUMNS = ["round", "client", "status", "examples", "loss", "accuracy", "epsilon",
                  "steps", "noise_multiplier", "sample_rate", "train_seconds",
                  "accounting_seconds"]
ROUND_COLUMNS = ["round", "test_accuracy", "test_loss", "test_balanced_accuracy",
                 "test_macro_f1", "test_auc", "majority_baseline", "max_epsilon", "user_epsilon",
                 "clients_trained", "clients_declined", "clients_failed", "elapsed_seconds"]
# train.task = "regression": no accuracy column anywhere (left out, not left empty); scores in
# the label's units and the baseline of predicting the test rows' mean (common.evaluation)
REGRESSION_METRIC_COLUMNS = [c for c in METRIC_COLUMNS if c != "accuracy"]
REGRESSION_ROUND_COLUMNS = ["round", "test_rmse", "test_mae", "test_r2", "test_loss",
                            "baseline_rmse", "baseline_mae", "max_epsilon", "user_epsilon",
                            "clients_trained", "clients_declined", "clients_failed",
                            "elapsed_seconds"]


def metric_columns(regression: bool = False) -> list[str]:
    """metrics.csv's columns for the run's task."""
    return REGRESSION_METRIC_COLUMNS if regression else METRIC_COLUMNS


def round_columns(regression: bool = False) -> list[str]:
    """rounds.csv's columns for the run's task."""
    return REGRESSION_ROUND_COLUMNS if regression else ROUND_COLUMNS


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Write `data` to a temporary file beside `path` and rename it over `path`: a reader
    sees the old file or the new one, never half of one, even if this process is killed.
    `durable` also fsyncs before the rename, so a power loss cannot leave an empty file
    (~2 ms a file here): a run's per-round files skip it, and sync() them at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes 0600; results are as readable as any file the user makes (the
        # plots, written by matplotlib, are): 0666 less the umask
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str, *, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def sync(*paths: Path) -> None:
    """fsync files written without `durable` (those that exist)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def json_safe(value: Any) -> Any:
    """JSON has no infinity: write non-finite floats as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict, *, compact: bool = False, durable: bool = True) -> None:
    """`data` as JSON, atomically; indented, or with `compact` on one line through the C
    encoder (json's indented output is pure Python: at cross-device scale, ~10x slower)."""
    text = json.dumps(json_safe(data), allow_nan=False, **({} if compact else {"indent": 2}))
    atomic_write_text(path, text + "\n", durable=durable)


def write_csv(path: Path, columns: list[str], rows: Iterable[dict], *,
              durable: bool = True) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue(), durable=durable)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / SUMMARY).read_text(encoding="utf-8"))


def read_audit(run_dir: Path) -> dict | None:
    """The run's audit, or None when it has not been audited."""
    path = Path(run_dir) / AUDIT
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
