"""The `privet` command: `privet simulate --config FILE --set key=value --out DIR`."""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from privet.common import results
from privet.common.config import (CONFIGS_DIR, DEFAULT_CONFIG, ConfigError, ExperimentConfig,
                                   load_config)
from privet.common.run_dir import RunDirError
from privet.experiments.lifetime import exit_code, stop_signals
from privet.common.run_dir import claim as run_dir_claim
from privet.experiments.cli_common import (ConfigFile, Overrides, console, err, exit_now,
                                            fail, say)
from privet.experiments.cli_deploy import deploy_app, run_deployed
from privet.experiments.cli_ledger import ledger

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="privet: federated learning with differential privacy, simulated.")


@app.callback()
def _group() -> None:
    """privet: federated learning with differential privacy, simulated."""


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class RoundWatcher(threading.Thread):
    """Reports each finished round by reading the run directory the server writes."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, after: int = 0) -> None:
        """`after`: the rounds a resumed run had finished (not reported again)."""
        super().__init__(daemon=True)
        self.run_dir, self.cfg = run_dir, cfg
        self.stop = threading.Event()
        self.reported = after  # the last round reported

    def poll(self) -> None:
        if self.cfg.drift.source:
            return self.poll_drift()
        try:
            rows = results.read_csv(self.run_dir / results.ROUNDS)
        except (FileNotFoundError, OSError):
            return
        for row in rows:
            if int(row["round"]) <= self.reported:
                continue
            privacy = ""
            if row.get("max_epsilon"):
                privacy += f"max ε {row['max_epsilon']:>8}  "
            if row.get("user_epsilon"):
                privacy += f"user ε {row['user_epsilon']:>8}  "
            console.print(f"round {int(row['round']):>3}/{self.cfg.rounds}  "
                          + _round_scores(row) + f"{privacy}"
                          f"clients {row['clients_trained']:>3}  "
                          f"{float(row['elapsed_seconds']):6.1f}s"  # rounds.csv's clock
                          + ("  no client trained: the model is unchanged"
                             if int(row["clients_trained"]) == 0 else ""), soft_wrap=True)
            self.reported = int(row["round"])

    def poll_drift(self) -> None:
        """Drift mode: drift.csv's rows (the window, its signals, detections, retraining)."""
        try:
            rows = results.read_csv(self.run_dir / "drift.csv")
        except (FileNotFoundError, OSError):
            return
        for row in rows:
            if int(row["round"]) <= self.reported:
                continue
            signals = (f"error {float(row['error_rate']):.3f}  PSI {float(row['psi']):6.3f}  "
                       if row.get("error_rate") else " " * 27)
            console.print(f"round {int(row['round']):>3}/{self.cfg.rounds}  window "
                          f"{int(row['window']):>3}  accuracy {float(row['accuracy']):.4f} "
                          f"(majority {float(row['majority']):.4f})  {signals}"
                          f"{'trained' if int(row['trained']) else '       '}"
                          + (f"  DRIFT DETECTED ({row['signal']})" if int(row["detected"])
                             else "")
                          + ("  retraining" if int(row["retrained"]) else ""),
                          markup=False, soft_wrap=True)
            self.reported = int(row["round"])

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.poll()
        self.poll()


def _round_scores(row: dict) -> str:
    """A rounds.csv row's headline: accuracy and AUC, or RMSE and R² (regression)."""
    if "test_rmse" in row:
        return (f"test RMSE {float(row['test_rmse']):.4g}  "
                + (f"R² {float(row['test_r2']):.4f}  " if row.get("test_r2") else ""))
    return (f"test accuracy {float(row['test_accuracy']):.4f}  "
            + (f"AUC {float(row['test_auc']):.4f}  " if row.get("test_auc") else ""))


EXIT_FAILURES = 3  # the run finished, but some clients failed (named in the summary)
CLIENTS_SHOWN = 20  # more clients than this: a summary line and the 10 that spent most


def print_summary(run_dir: Path) -> None:
    summary = results.read_summary(run_dir)
    if "drift" in summary or summary.get("mode") == "drift":
        return print_drift_summary(summary, run_dir)
    privacy = summary["privacy"]
    clients = list(privacy["clients"].items())
    table = Table(title=f"privet · {summary['name']} · {summary['status']}")
    earlier = any((c.get("earlier_runs_epsilon") or 0) > 0 for _, c in clients)
    columns = ("client", "ε spent", *(("of it earlier runs",) if earlier else ()), "target",
               "rounds trained", "stopped")
    for column in columns:
        table.add_column(column, justify="right")
    shown = clients
    if len(clients) > CLIENTS_SHOWN:
        shown = sorted(clients, key=lambda kv: (-(kv[1]["epsilon"] or 0.0),
                                                -kv[1]["rounds_trained"]))[:10]
        most = ("spent most" if any(c["epsilon"] is not None for _, c in clients) else
                "trained most (none ran DP-SGD: the user-level ε below covers each)")
        table.caption = (f"the 10 of {len(clients)} clients that {most}; every client is "
                         f"in summary.json")
    for cid, c in shown:
        eps = "- (no DP-SGD)" if c["epsilon"] is None else f"{c['epsilon']:.4f}"
        target = "-" if c.get("target_epsilon") is None else f"{c['target_epsilon']:g}"
        stopped = {"too-small": "left out: too few rows", "failed": "left out: failed"}.get(
            c.get("left_out"), "before round 1" if c["stopped_round"] == 0
            else str(c["stopped_round"] or "-"))
        before = (f"{c.get('earlier_runs_epsilon') or 0:.4f}",) if earlier else ()
        table.add_row(cid, eps, *before, target, str(c["rounds_trained"]), stopped)
    console.print(table)
    if earlier:
        console.print("ε spent composes every earlier run on the same rows (privacy.ledger-dir)")
    per_client = summary.get("preprocess", {}).get("estimated_bounds_per_client")
    if per_client:
        shown = "; ".join(f"client {cid}: " + ", ".join(f"{c} [{lo:g}, {hi:g}]"
                                                      for c, (lo, hi) in ranges.items())
                          for cid, ranges in list(per_client.items())[:3])
        console.print(f"ranges each client estimated with DP (values beyond them are clipped; "
                      f"declare data.bounds for exact ones): {shown}"
                      + (" …" if len(per_client) > 3 else ""))
    estimated = summary.get("preprocess", {}).get("estimated_bounds")
    if estimated:
        console.print("ranges estimated with DP (values beyond them are clipped; declare "
                      "data.bounds for exact ones): " + ", ".join(
                          f"{c} [{lo:g}, {hi:g}]" for c, (lo, hi) in estimated.items()))
    purposes = list(dict.fromkeys(p for _, c in clients for p in c.get("spent_on", {})))
    if purposes:
        console.print(f"ε spent on: {', '.join(purposes)} (per client: privacy.clients.*."
                      f"spent_on in summary.json)")
    spent = [c["epsilon"] for _, c in clients if c["epsilon"] is not None]
    if len(clients) > CLIENTS_SHOWN and spent:
        console.print(f"{len(spent)} clients spent ε: median {sorted(spent)[len(spent) // 2]:.4f}"
                      f", max {max(spent):.4f}; "
                      f"{sum(1 for _, c in clients if c['stopped_round'])} ran out of budget")
    parts = []
    if privacy["max_epsilon"] is not None:
        parts.append(f"sample-level max ε {privacy['max_epsilon']:.4f} of target "
                     f"{privacy['target_epsilon']:g}")
    user = privacy.get("user_level")
    if user and user["epsilon"] is not None:
        parts.append(f"user-level ε {user['epsilon']:.4f} of target {user['target_epsilon']:g}")
    eps_line = (" and ".join(parts) + f" at δ = {privacy['delta']:g} ({privacy['accountant']})"
                if parts else "no differential privacy")
    if summary.get("task") == "regression":
        _print_regression_scores(summary, eps_line)
    else:
        accuracy = summary["accuracy"]
        where = ("held-out accuracy (clients' own rows)"
                 if summary.get("evaluation") == "federated" else "test accuracy")
        console.print(f"{where} [bold]{accuracy:.4f}[/] after {summary['rounds']} round(s); "
                      f"{escape(eps_line)}; {summary['wall_seconds']:.1f}s"
                      if accuracy is not None
                      else f"no round finished; {escape(eps_line)}", markup=True)
        scores = summary.get("scores") or {}
        named = [(label, scores.get(key)) for label, key in (
            ("majority class", "majority_baseline"),
            ("balanced accuracy", "test_balanced_accuracy"),
            ("macro F1", "test_macro_f1"), ("ROC AUC", "test_auc"))]
        if accuracy is not None and any(v is not None for _, v in named):
            console.print("  " + ", ".join(f"{label} {v:.4f}" for label, v in named
                                           if v is not None))
    if summary.get("stop_reason"):
        err.print(f"privet: stopped after round {summary['rounds']}: "
                  f"{summary['stop_reason']}", soft_wrap=True)
    failures = summary.get("failures", {}).get("clients", {})
    for cid, failure in failures.items():
        when = f"round {failure['round']}" if failure["round"] else "before round 1"
        err.print(f"privet: client {cid} failed in {failure['stage']} ({when}) and was left "
                  f"out: {failure['reason']}", soft_wrap=True)
    if failures:
        err.print(f"privet: the run finished with failures: {len(failures)} of "
                  f"{summary['num_clients']} clients failed", soft_wrap=True)
    for line in privacy.get("not_covered", []):
        console.print(f"not covered by ε: {line}")
    for line in tracking_lines(summary):
        console.print(line)
    console.print(f"results: {run_dir}")


def print_drift_summary(summary: dict, run_dir: Path) -> None:
    """A drift run's end: detections against the true drift, retrains, ε per window."""
    drift, privacy = summary.get("drift") or {}, summary["privacy"]
    console.print(f"privet · {summary['name']} · {summary['status']} · drift mode "
                  f"({drift.get('source', '?')}, policy {drift.get('policy', '?')})",
                  markup=False)
    if drift:
        found = ", ".join(f"round {e['round']} ({e['signal']})" for e in drift["detections"])
        truth = ("unknown (set drift.drift-round to score the detections)"
                 if drift.get("false_alarms") is None and not drift["true_drift_rounds"]
                 else f"round(s) {drift['true_drift_rounds'] or 'none'}")
        delay = drift["detection_delay"]
        console.print(f"true drift at {truth}; detected at {found or 'no round'}; detection "
                      f"delay {'–' if delay is None else f'{delay} round(s)'}, false alarms "
                      f"{'–' if drift['false_alarms'] is None else drift['false_alarms']}; "
                      f"retrained at {drift['retrains'] or 'no round'}", markup=False,
                      soft_wrap=True)
    eps = privacy.get("max_window_epsilon")
    accuracy = summary.get("accuracy")
    accuracy = ("n/a" if accuracy is None or math.isnan(accuracy) else f"{accuracy:.4f}")
    console.print(f"accuracy on the newest window {accuracy} after "
                  f"{summary['rounds']} round(s); ε per window ≤ {eps:.4g} of "
                  f"{privacy['epsilon_per_window_target']:g} (δ = {privacy['delta']:g}; "
                  f"event level: one row of one window); {summary['wall_seconds']:.1f}s; "
                  f"{run_dir / 'drift.csv'}", markup=False, soft_wrap=True)
    if privacy.get("epsilon_one_row_every_window") is not None:
        console.print(f"one person with a row in every window of a client: ε = "
                      f"{privacy['epsilon_one_row_every_window']:.4g} (every window's release "
                      "composed)", markup=False, soft_wrap=True)
    for line in privacy.get("not_covered") or []:
        console.print(f"not covered by ε: {line}", markup=False, soft_wrap=True)
    for reason in (summary.get("failures") or {}).get("clients", {}).values():
        err.print(f"privet: a client failed: {reason}", markup=False, soft_wrap=True)


def tracking_lines(summary: dict) -> list[str]:
    """Where `[tracking]` logged the run (summary.json → tracking), one line per backend; a
    backend that failed was named in a warning when it did."""
    lines = []
    for key, state in (summary.get("tracking") or {}).items():
        where = (f"experiment {state.get('experiment')!r}, run {state.get('run_id')} at "
                 f"{state.get('uri')}" if key == "mlflow" else state.get("dir"))
        lines.append(f"tracked in {key}: {where}" if state.get("ok") else
                     f"tracking in {key} stopped ({state.get('error')}); the run directory "
                     "holds every result")
    return lines


def _print_regression_scores(summary: dict, eps_line: str) -> None:
    """The last round's RMSE, MAE and R² beside the baseline's (predicting the test rows'
    mean), in a table, in the label's units."""
    scores, target = summary.get("scores") or {}, summary.get("target") or {}
    if scores.get("test_rmse") is None:
        console.print(f"no round finished; {escape(eps_line)}", markup=False)
        return
    table = Table(title=f"test scores of {target.get('label', 'the label')} after "
                        f"{summary['rounds']} round(s), in its units")
    for column in ("", "RMSE", "MAE", "R²"):
        table.add_column(column, justify="left" if not column else "right")
    shown = (lambda v: "-" if v is None else f"{v:.4g}")
    table.add_row("model", shown(scores.get("test_rmse")), shown(scores.get("test_mae")),
                  "-" if scores.get("test_r2") is None else f"{scores['test_r2']:.4f}")
    table.add_row("baseline (test mean)", shown(scores.get("baseline_rmse")),
                  shown(scores.get("baseline_mae")), "0")
    console.print(table)
    console.print(f"{escape(eps_line)}; {summary['wall_seconds']:.1f}s", markup=False)


def print_partitions(report: list[dict], cfg) -> None:
    """Rows, label balance and missing cells per client; long federations are summarised.

    Per-class counts are shown for up to four classes; partitions.csv always has them."""
    if report and "label-mean" in report[0]:
        _print_regression_partitions(report, cfg)
        return
    labels = [k for k in report[0] if k.startswith("label=")] if report else []
    shown_labels = labels if len(labels) <= 4 else []
    table = Table(title=f"partitions: {cfg.data.dataset}, {cfg.data.partition}")
    for column in ("client", "rows", *(k[len("label="):] for k in shown_labels), "classes",
                   "majority", "missing cells"):
        table.add_column(column, justify="right")
    shown = report if len(report) <= 20 else report[:10] + report[-5:]
    for r in shown:
        small = " (< batch)" if r["rows"] < cfg.train.batch_size else ""
        present = sum(r[k] > 0 for k in labels)
        table.add_row(str(r["client"]), f"{r['rows']}{small}",
                      *(str(r[k]) for k in shown_labels), f"{present}/{len(labels)}",
                      f"{r['majority-share']:.2f}", str(r["missing-cells"]))
        if len(report) > 20 and r is report[9]:
            table.add_row("…", *([""] * (len(shown_labels) + 4)))
    console.print(table)


def _print_regression_partitions(report: list[dict], cfg) -> None:
    """Rows, the label's mean and standard deviation and missing cells per client."""
    table = Table(title=f"partitions: {cfg.data.dataset}, {cfg.data.partition}"
                        + (" (label quantile bins)" if cfg.data.partition in
                           ("dirichlet", "shards") else ""))
    for column in ("client", "rows", f"{cfg.data.label} mean", "std", "missing cells"):
        table.add_column(column, justify="right")
    shown = report if len(report) <= 20 else report[:10] + report[-5:]
    for r in shown:
        small = " (< batch)" if r["rows"] < cfg.train.batch_size else ""
        table.add_row(str(r["client"]), f"{r['rows']}{small}", f"{r['label-mean']:.4g}"
                      if r["label-mean"] is not None else "-", f"{r['label-std']:.4g}"
                      if r["label-std"] is not None else "-", str(r["missing-cells"]))
        if len(report) > 20 and r is report[9]:
            table.add_row("…", "", "", "", "")
    console.print(table)


def _origin(message: str, config: Path, overrides: list[str]) -> str:
    """Where the setting an error names came from: its --set override(s), else the file."""
    named = [o for o in overrides if message.startswith(o.split("=", 1)[0].strip() + ":")]
    return ", ".join(f"--set {o}" for o in named) or str(config)


def _unclaim(run_dir: Path, claimed: bool) -> None:
    """Remove the run directory this invocation created, when the run never started."""
    if claimed:
        shutil.rmtree(run_dir, ignore_errors=True)


def _ray_address_option(address: Optional[str]) -> Optional[str]:
    from privet.experiments.simulation import RayAddressError, check_ray_address

    try:
        return None if address is None else check_ray_address(address)
    except RayAddressError as error:
        raise typer.BadParameter(str(error).removeprefix("--ray-address ")) from None


@app.command()
def simulate(
    config: ConfigFile = DEFAULT_CONFIG,
    overrides: Overrides = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="run directory (default runs/<name>-<timestamp>)")] = None,
    overwrite: Annotated[bool, typer.Option(help="reuse a run directory that holds a run")
                         ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower's logs")
                       ] = False,
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", metavar="HOST:PORT", callback=_ray_address_option,
        help="run the clients on this running Ray cluster (`ray start --head` prints its "
             "address; `auto`: the one started on this machine) instead of a Ray of its own"
    )] = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", metavar="RUN_DIR", help="continue the stopped run in RUN_DIR after its "
        "last finished round, with its own config (Ctrl-C, SIGTERM, SIGKILL or "
        "--pause-after stopped it)")] = None,
    pause_after: Annotated[int, typer.Option(
        "--pause-after", metavar="ROUND", min=0, help="stop after this round with status "
        "paused; --resume continues it (0: run to the end)")] = 0,
) -> None:
    """Run an experiment on Flower's simulation runtime and write its results.

    Examples:

      privet simulate                                  # the default experiment

      privet simulate --set rounds=5 --set privacy.epsilon=1 --out runs/a

      privet simulate --config experiments/configs/tiny.toml --set privacy.level=none

      privet simulate --ray-address 10.0.0.5:6379      # on a Ray cluster, one client per CPU

      privet simulate --resume runs/a                  # go on after its last finished round
    """
    resumed_after = 0
    if resume is not None:  # the run's own config, from its directory
        if overrides or out is not None or overwrite or config != DEFAULT_CONFIG:
            fail("--resume continues a run with the config it started with: leave out "
                 "--config, --set, --out and --overwrite")
        run_dir = resume.expanduser().resolve()
        if not (run_dir / results.CONFIG).is_file():
            fail(f"--resume {run_dir}: not a privet run directory (no {results.CONFIG})")
        claimed = False
        try:
            drift_run = bool(load_config(run_dir / results.CONFIG).drift.source)
        except ValueError:
            drift_run = False
        if drift_run:
            fail(f"--resume {run_dir}: a drift-mode run cannot be resumed yet; start it again "
                 "with --overwrite")
        try:  # first: a run still going has no checkpoint yet, and is not "stopped"
            run_dir_claim(run_dir, option="--resume")
        except RunDirError as error:
            fail(str(error))
        cfg, resumed_after = resumable(run_dir)
    else:
        try:
            cfg = load_config(config, overrides or [])
        except ConfigError as error:
            fail(str(error))
        if cfg.drift.source and pause_after:
            fail(f"--pause-after {pause_after}: drift mode cannot pause (nor resume) yet; "
                 "use rounds to end it earlier")
        if cfg.privacy.ledger_dir:  # Ray actors need an absolute path
            cfg = dataclasses.replace(cfg, privacy=dataclasses.replace(
                cfg.privacy,
                ledger_dir=str(Path(cfg.privacy.ledger_dir).expanduser().resolve())))
        run_dir = (out or default_run_dir(cfg)).resolve()
        claimed = not run_dir.exists()  # this invocation makes it: removed if nothing runs
        try:  # before any data is read: a second run into one --out is refused at once
            run_dir_claim(run_dir, finished=results.SUMMARY, stale=results.RUN_FILES,
                          overwrite=overwrite)
            results.atomic_write_text(run_dir / results.CONFIG, cfg.to_toml())
        except RunDirError as error:
            fail(str(error) + _resume_hint(run_dir))
        except OSError as error:
            fail(f"--out {run_dir}: cannot write the run directory "
                 f"({error.strerror or error})")
    if pause_after and pause_after <= resumed_after:
        fail(f"--pause-after {pause_after}: the run has finished round {resumed_after} "
             "already")
    if pause_after >= cfg.rounds:
        err.print(f"privet: note: --pause-after {pause_after} ≥ rounds = {cfg.rounds}: the "
                  "run goes to its end", soft_wrap=True)
    from privet.experiments import simulation  # heavy imports (torch, flwr, ray) only now

    simulation.start_early(ray_address)
    from privet.common.data.tables import DataError
    from privet.common.models import ModelError
    from privet.common.device import DeviceError, check_simulation_device
    from privet.common.privacy.ledger import LedgerError

    try:  # a GPU asked for where there is none: one line now, not a traceback in a worker
        check_simulation_device(cfg.train.device, cluster=bool(ray_address), on_ray=bool(
            ray_address) or os.environ.get(simulation.BACKEND_ENV, "processes") == "ray")
    except DeviceError as error:
        _unclaim(run_dir, claimed)
        named = [o for o in overrides or [] if o.split("=", 1)[0].strip() == "train.device"]
        fail(f"{f'--set {named[-1]}' if named else config}: {error}")
    try:
        report, data_warnings = simulation.preflight(cfg)
    except (LedgerError, DataError, ModelError, ValueError, FileNotFoundError) as error:
        _unclaim(run_dir, claimed)  # nothing ran: no run directory is left behind
        if isinstance(error, (LedgerError, DataError, ModelError)):  # they name their file
            fail(str(error))
        fail(f"{_origin(str(error), config, overrides or [])}: {error}")
    levels = []
    if cfg.private:
        levels.append(f"sample-level ε = {cfg.privacy.epsilon:g} per client"
                      + (f" (client:ε {cfg.privacy.client_epsilon})"
                         if cfg.privacy.client_epsilon else ""))
    if cfg.user_level:
        levels.append(f"user-level ε = {cfg.privacy.user_epsilon:g}")
    privacy = (", ".join(levels) + f", δ = {cfg.privacy.delta:g}, "
               f"{'seeded' if cfg.privacy.noise_source != 'secure' else 'secure'} noise"
               if levels else "no differential privacy")
    console.print(f"privet: {cfg.name}: {cfg.num_clients} clients, {cfg.clients_per_round} "
                  f"per round, {cfg.rounds} rounds, {privacy} → {run_dir}")
    if resumed_after:
        console.print(f"privet: resuming after round {resumed_after} of {cfg.rounds}")
    if cfg.drift.source and cfg.private and cfg.drift.source not in ("csv", "parquet"):
        from privet.common.drift import signals, streams

        d = len(streams.feature_names(cfg))
        std = (cfg.drift.monitor_noise * signals.sensitivity(d)
               / (math.sqrt(cfg.num_clients) * cfg.drift.rows_per_window))
        console.print(f"privet: monitoring noise per window: ±{std:.3f} on the error rate and "
                      f"on each bin's share (σ {cfg.drift.monitor_noise:g} · √(3 + {d}) · "
                      f"√{cfg.num_clients} clients over {cfg.num_clients} × "
                      f"{cfg.drift.rows_per_window} rows); smaller drifts than a few times "
                      "this cannot be seen", markup=False, soft_wrap=True)

    for line in data_warnings:
        err.print(f"privet: warning: {line}", soft_wrap=True)
    if report:
        print_partitions(report, cfg)
    watcher = RoundWatcher(run_dir, cfg, after=resumed_after)
    watcher.start()
    code = 0
    try:
        simulation.run(cfg, run_dir, verbose=verbose, ray_address=ray_address,
                       resume=resume is not None, pause_after=pause_after)
    except simulation.RayAddressError as error:
        code = 2
        err.print(f"privet: error: {error}", markup=False, soft_wrap=True)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (privet.experiments.lifetime)
        code = exit_code(stop)
        err.print(f"privet: interrupted ({stop}); finished rounds are kept")
        _mark(run_dir, "interrupted")
    except Exception as error:  # noqa: BLE001 - one line for the user, details with -v
        code = 1
        _mark(run_dir, "failed")
        err.print(f"privet: error: the simulation failed: {error}", soft_wrap=True)
        if verbose:
            raise
    finally:
        watcher.stop.set()
        watcher.join(timeout=5)
    if (run_dir / results.SUMMARY).exists():
        print_summary(run_dir)
        status = results.read_summary(run_dir)["status"]
        if not code and status == "complete-with-failures":
            code = EXIT_FAILURES
        if status in RESUMABLE and not cfg.drift.source:
            err.print(f"privet: continue it with: privet simulate --resume {run_dir}",
                      soft_wrap=True)
    exit_now(code)


RESUMABLE = ("paused", "interrupted", "failed", "running")  # a run --resume continues


def _resume_hint(run_dir: Path) -> str:
    """For a refused --out that holds a stopped run with a checkpoint: how to continue it
    (--overwrite would start again at round 1)."""
    try:
        status = results.read_summary(run_dir).get("status")
    except (OSError, ValueError):
        return ""
    if status in RESUMABLE and (run_dir / results.CHECKPOINT).is_file():
        said = "it stopped without a final status (killed?)" if status == "running" \
            else f"it is {status}"
        return (f"; {said}: continue it with privet simulate --resume {run_dir} "
                "(--overwrite starts again at round 1)")
    return ""
FINISHED = ("complete", "complete-with-failures", "budget-exhausted")


def resumable(run_dir: Path) -> tuple[ExperimentConfig, int]:
    """The config of the stopped run in `run_dir` and the round its checkpoint holds; exits
    with one line when there is nothing to resume (not a run, finished, no checkpoint, a
    checkpoint of another config)."""
    where = f"--resume {run_dir}"
    if not (run_dir / results.CONFIG).is_file():
        fail(f"{where}: not a privet run directory (no {results.CONFIG})")
    try:
        status = results.read_summary(run_dir).get("status")
    except (OSError, ValueError):
        status = None
    if status in FINISHED:
        fail(f"{where}: the run is {status}: there is nothing to resume")
    try:
        cfg = load_config(run_dir / results.CONFIG, [])
    except ConfigError as error:
        fail(str(error))
    cfg = dataclasses.replace(cfg, out_dir=str(run_dir))
    from privet.server.checkpoint import Checkpoint, CheckpointError, check_ledgers

    if not (run_dir / results.CHECKPOINT).is_file() and status is not None:
        try:
            done = int(results.read_summary(run_dir).get("rounds") or 0)
        except (OSError, ValueError, TypeError):
            done = 0
        if done:
            fail(f"{run_dir / results.CHECKPOINT}: missing: the run finished round {done} "
                 "but its checkpoint is gone; start it again with --overwrite")
    try:
        saved = Checkpoint.load(run_dir, cfg.to_toml())
        check_ledgers(saved, run_dir)
    except CheckpointError as error:
        fail(str(error))
    return cfg, saved.round


@app.command()
def budget(
    rounds: Annotated[int, typer.Option(min=1, help="federated rounds")] = 20,
    users: Annotated[Optional[int], typer.Option(
        min=1, help="user level (DP-FedAvg): participants in the federation (privet "
                    "simulate's num-clients); give --cohort too")] = None,
    cohort: Annotated[Optional[int], typer.Option(
        min=1, help="user level: participants expected in each round (clients-per-round); "
                    "each joins a round with probability q = cohort/users")] = None,
    steps_per_round: Annotated[Optional[int], typer.Option(
        min=1, help="sample level: DP-SGD steps per round (or give --rows)")] = None,
    sample_rate: Annotated[Optional[float], typer.Option(
        min=0.0, max=1.0, help="sample level: Poisson sampling rate q (or give --rows)")] = None,
    rows: Annotated[Optional[int], typer.Option(
        min=1, help="sample level: rows on the client: q = 1/⌈rows/B⌉, ⌈rows/B⌉ steps per "
                    "epoch")] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, show_default="64", help="sample level, with --rows: expected batch size B"
    )] = None,
    local_epochs: Annotated[Optional[int], typer.Option(
        min=1, show_default="1", help="sample level, with --rows: local epochs")] = None,
    sigma: Annotated[Optional[float], typer.Option(
        min=0.0, help="noise multiplier: print ε over rounds")] = None,
    epsilon: Annotated[Optional[str], typer.Option(
        help="target ε values, comma-separated: print the σ each needs")] = None,
    delta: Annotated[float, typer.Option(min=0.0, max=0.1)] = 1e-5,
    preprocess_epsilon: Annotated[float, typer.Option(
        min=0.0, help="sample level: ε spent before DP-SGD on preprocessing statistics "
                      "(privet simulate's preprocess.epsilon, 0.3 by default; 0 = none)")] = 0.0,
    accountant: Annotated[str, typer.Option(
        help="accountants to tabulate, comma-separated: pld, prv, rdp, or all")] = "all",
    out: Annotated[Path, typer.Option(help="PNG to write (never over a file privet did not "
                                           "write)")] = Path("budget.png"),
) -> None:
    """Plan a privacy budget without training, with every accountant side by side.

    Sample level (DP-SGD on one client): --rows (with --batch-size, --local-epochs), or
    --steps-per-round with --sample-rate. User level (DP-FedAvg: one noised, clipped sum of
    updates a round, participants Poisson-sampled at q = cohort/users): --users with
    --cohort; σ is then the noise multiplier of each round's release, relative to the clip
    S. The PLD column is tight (dp-accounting's PLD, an upper bound); at cross-device scale
    PRV and RDP take much longer: --accountant pld.

    Examples:

      privet budget --rows 3256 --rounds 20 --sigma 0.8

      privet budget --rows 3256 --rounds 20 --epsilon 0.5,1,2,4,8

      privet budget --steps-per-round 50 --sample-rate 0.02 --rounds 30 --sigma 1

      privet budget --users 1000000 --cohort 1000 --rounds 10000 --sigma 1 --accountant pld

      privet budget --users 1000000 --cohort 1000 --rounds 10000 --epsilon 1,2,4,8
      --accountant pld
    """
    from privet.experiments import budget as planning

    if out.exists() and not planning.written_by_privet(out):
        fail(f"--out {out}: exists and was not written by privet budget; choose another path")
    names = _accountant_names(accountant)
    if (sigma is None) == (epsilon is None):
        fail("give exactly one of --sigma (to get ε) or --epsilon (to get σ)")
    if not delta > 0:
        fail(f"--delta {delta:g}: expected a probability above 0 (and at most 0.1), e.g. 1e-5")
    if sigma is not None and not 0 < sigma < math.inf:
        fail(f"--sigma {sigma:g}: expected a finite noise multiplier above 0, e.g. 1.0")
    targets: list[float] = []
    if epsilon is not None:  # checked before anything is printed
        items = [t.strip() for t in epsilon.split(",")]
        try:
            targets = [float(t) for t in items]
        except ValueError:
            fail(f"--epsilon {epsilon!r}: expected numbers separated by commas, e.g. 1,2,4")
        if any(not 0 < t < math.inf for t in targets):
            fail(f"--epsilon {epsilon!r}: every target must be a finite number > 0")
    if users is not None or cohort is not None:
        plan = _user_plan(users, cohort, rounds, delta, rows=rows, batch_size=batch_size,
                          local_epochs=local_epochs, steps_per_round=steps_per_round,
                          sample_rate=sample_rate, preprocess_epsilon=preprocess_epsilon)
        console.print(f"plan: user level (DP-FedAvg), {plan.rounds} rounds, each of "
                      f"{plan.users:,} users joining with probability q = {plan.cohort:,}/"
                      f"{plan.users:,} = {plan.sample_rate:.5g}, δ = {plan.delta:g}; σ is "
                      "each round's noise multiplier (noise σ·S for clip S; with adaptive "
                      "clipping, of the model and count queries together)")
        if plan.delta * plan.users >= 1:
            console.print(f"note: δ = {plan.delta:g} is not below 1/users = "
                          f"{1 / plan.users:.3g}: a user-level guarantee usually asks for "
                          "δ < 1/users (--delta)")
    else:
        prior = planning.release_at(preprocess_epsilon, delta)
        if rows is not None:
            plan = planning.Plan.from_rows(rows, batch_size or 64, local_epochs or 1, rounds,
                                           delta, prior)
        elif steps_per_round is not None and sample_rate:
            if batch_size is not None or local_epochs is not None:
                fail("--batch-size and --local-epochs go with --rows, not with "
                     "--steps-per-round and --sample-rate")
            plan = planning.Plan(rounds, steps_per_round, sample_rate, delta, prior)
        else:
            fail("give --rows (with --batch-size), or both --steps-per-round and "
                 "--sample-rate (sample level), or --users with --cohort (user level)")
        console.print(f"plan: {plan.rounds} rounds × {plan.steps_per_round} steps at q = "
                      f"{plan.sample_rate:.5g}, δ = {plan.delta:g}"
                      + (f", after preprocessing statistics at ε = {preprocess_epsilon:g}"
                         if prior else "; DP-SGD only: privet simulate first spends "
                         "preprocess.epsilon (0.3 by default) on its preprocessing statistics, "
                         "--preprocess-epsilon 0.3 plans with it"))
    left_out = [n for n in planning.ACCOUNTANTS if n not in names]
    if left_out:
        console.print(f"accountants: {', '.join(names)}; left out: {', '.join(left_out)} "
                      "(--accountant all adds them)")
    elif isinstance(plan, planning.UserPlan) and plan.rounds >= 1000:
        console.print(f"accountants: pld, prv, rdp; PRV and RDP take longer over "
                      f"{plan.rounds:,} rounds (tens of seconds): --accountant pld answers "
                      "in seconds")
    if sigma is not None:
        try:
            curves = planning.epsilon_over_rounds(plan, sigma, names)
        except ValueError as error:  # σ so small that the PLD grid would not fit
            fail(f"--sigma {sigma:g}: {error}")
        table = Table(title=f"ε after each round (σ = {sigma:g})")
        table.add_column("round", justify="right")
        for name in curves:
            table.add_column(f"ε {name}", justify="right")
        for i, (r, _) in enumerate(next(iter(curves.values()))):
            table.add_row(str(r), *(f"{curves[name][i][1]:.4f}" for name in curves))
        console.print(table)
        console.print(f"plot: {planning.plot_epsilon(curves, sigma, out)}")
        return
    try:
        needed = planning.sigma_for_targets(plan, targets, names)
    except ValueError as error:  # a target no noise level in range reaches
        fail(f"--epsilon {epsilon}: {error}")
    whole = (f"{plan.rounds} rounds" if isinstance(plan, planning.UserPlan)
             else f"{plan.steps} steps")
    table = Table(title=f"σ needed for the whole run ({whole})")
    table.add_column("target ε", justify="right")
    for name in needed:
        table.add_column(f"σ {name}", justify="right")
    for i, t in enumerate(targets):
        # rounded up: the σ printed meets the target too
        table.add_row(f"{t:g}", *(f"{math.ceil(needed[name][i][1] * 1e4) / 1e4:.4f}"
                                  for name in needed))
    console.print(table)
    console.print(f"plot: {planning.plot_sigma(needed, out)}")


def _accountant_names(text: str) -> tuple[str, ...]:
    """`--accountant`'s list (all = pld, prv, rdp), in the given order; one line on error."""
    from privet.common.privacy.accountants import ACCOUNTANTS

    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        return ACCOUNTANTS
    unknown = [n for n in names if n not in ACCOUNTANTS]
    if unknown or not names:
        fail(f"--accountant {text!r}: expected pld, prv, rdp (comma-separated) or all")
    return tuple(dict.fromkeys(names))


def _user_plan(users, cohort, rounds, delta, **sample_level):
    """The user-level plan, or one line on what does not go with it."""
    from privet.experiments.budget import UserPlan

    if users is None or cohort is None:
        fail("user level needs both --users and --cohort (participants expected each round)")
    given = [f"--{k.replace('_', '-')}" for k, v in sample_level.items()
             if v is not None and not (k == "preprocess_epsilon" and v == 0)]
    if given:
        fail(f"{', '.join(given)}: sample-level options, not with --users/--cohort (user "
             "level: nothing is charged before DP-FedAvg there; preprocessing is fitted "
             "locally)")
    if cohort > users:
        fail(f"--cohort {cohort}: more than --users {users}; the cohort is the number of "
             "participants expected in a round")
    return UserPlan(users, cohort, rounds, delta)


@app.command("drift-compare")
def drift_compare(
    config: Annotated[Path, typer.Option(
        "--config", "-c", help="experiment TOML file with a \\[drift] section",
        show_default="the shipped experiments/configs/drift-agrawal.toml")
                      ] = CONFIGS_DIR / "drift-agrawal.toml",
    policies: Annotated[str, typer.Option(
        help="retraining policies, comma-separated: never, periodic, on-drift")
                        ] = "never,periodic,on-drift",
    seeds: Annotated[int, typer.Option(
        min=1, help="runs per policy, with seeds seed, seed+1, ... (seed from the config)")] = 1,
    overrides: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", help="override a key in every run, e.g. --set rounds=30 (repeatable)")
                         ] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="comparison directory; run the same command again to resume",
        show_default="runs/drift-<name>")] = None,
) -> None:
    """Compare retraining policies on one drift scenario (a config with a \\[drift] section).

    Runs one simulation per policy × seed into OUT/runs/<policy>-seed<s>, then writes
    drift_compare.csv, drift_curves.csv, drift_compare.md and drift_compare.png (the
    policies' accuracy curves side by side, the true drift marked).

    Example:

      privet drift-compare --config experiments/configs/drift-agrawal.toml --seeds 5
    """
    from privet.common.config import DRIFT_POLICIES
    from privet.experiments import drift_compare as dc

    chosen = [p.strip() for p in policies.split(",") if p.strip()]
    bad = [p for p in chosen if p not in DRIFT_POLICIES]
    if bad or not chosen:
        fail(f"--policies {policies!r}: expected some of {', '.join(DRIFT_POLICIES)}")
    try:
        base = load_config(config, overrides or [])
    except ValueError as error:
        fail(str(error))
    if not base.drift.source:
        fail(f"{config}: drift.source is empty: drift-compare needs a drift scenario "
             "(e.g. experiments/configs/drift-agrawal.toml)")
    out = (out or Path("runs") / f"drift-{base.name}").resolve()
    try:
        run_dir_claim(out)
    except RunDirError as error:
        fail(str(error))
    rows, curves, true_rounds = [], [], []
    console.print(f"privet drift-compare: {len(chosen)} policies × {seeds} seed(s) of "
                  f"{base.name} ({base.drift.source}, {base.rounds} rounds, "
                  f"{base.num_clients} clients), one run at a time → {out}", markup=False)
    with stop_signals():
        for seed in range(base.seed, base.seed + seeds):
            for policy in chosen:
                run_dir = dc.simulate(config.resolve(), list(overrides or []), out, policy, seed)
                try:
                    row, curve = dc.measure(run_dir, policy, seed)
                except (OSError, ValueError) as error:
                    err.print(f"privet: {dc.run_name(policy, seed)} failed: {error} (see "
                              f"{run_dir / 'simulate.log'})", markup=False, soft_wrap=True)
                    continue
                rows.append(row)
                curves.extend(curve)
                true_rounds = (results.read_summary(run_dir).get("drift") or {}).get(
                    "true_drift_rounds", true_rounds)
                console.print(f"✓ {dc.run_name(policy, seed)}: delay "
                              f"{row['detection_delay']}, false alarms {row['false_alarms']}, "
                              f"gap kept 5 rounds after detection {row.get('gap_kept_at_5')}",
                              markup=False)
    if not rows:
        fail("no run finished")
    dc.write(out, rows, curves, true_rounds,
             [out / "runs" / dc.run_name(r["policy"], r["seed"]) for r in rows])
    console.print((out / "drift_compare.md").read_text(), markup=False)
    console.print(f"→ {out / 'drift_compare.png'}", markup=False)


@app.command()
def compare(
    config: ConfigFile = DEFAULT_CONFIG,
    epsilons: Annotated[str, typer.Option(
        help="target ε values, comma-separated; inf adds the non-private baseline")
                        ] = "0.5,1,2,4,8,inf",
    seeds: Annotated[int, typer.Option(
        min=1, help="runs per cell, with seeds seed, seed+1, ... (seed from the config)")] = 3,
    levels: Annotated[str, typer.Option(
        help="privacy levels, comma-separated: sample (privacy.epsilon), user "
             "(privacy.user-epsilon)")] = "sample",
    overrides: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", help="override a key in every run, e.g. --set rounds=5 (repeatable)")
                         ] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="comparison directory; run the same command again to resume",
        show_default="runs/compare-<name>")] = None,
    jobs: Annotated[int, typer.Option(
        "--jobs", "-j", min=1, help="runs at a time; each gets cores/jobs CPUs")] = 1,
    audit: Annotated[bool, typer.Option(
        help="run the membership-inference audit after each run")] = True,
) -> None:
    """Run one simulation per level × ε × seed and compare accuracy, ε and the audit.

    Writes compare.csv, summary.md, plots and a self-contained report.html into --out;
    each run lives in OUT/runs/<level>-eps<ε>-seed<seed>. Finished runs with the same
    config are reused, so an interrupted comparison resumes where it stopped.

    Examples:

      privet compare --config experiments/configs/adult.toml --epsilons 0.5,1,2,4,8,inf

      privet compare --levels sample,user --seeds 2 --set rounds=5 --jobs 2 --out runs/cmp
    """
    from privet.experiments import compare as grid
    from privet.experiments import report
    from privet.experiments.simulation import simulation_cpus

    from privet.server.tracking import check as check_tracking

    try:
        eps, chosen = grid.parse_epsilons(epsilons), grid.parse_levels(levels)
        base = load_config(config, overrides or [])
        out = (out or Path("runs") / f"compare-{base.name}").resolve()
        # [tracking]: one MLflow experiment for the sweep (the folder's name, unless set)
        overrides = [*(overrides or []), *grid.tracking_overrides(base, out)]
        runs = grid.grid(base.seed, chosen, eps, seeds)
        expected = grid.resolve(config, overrides, runs)
    except ValueError as error:  # ConfigError included
        fail(str(error))
    try:  # a missing library: one line now, not in every run's log
        check_tracking(base)
    except ValueError as error:
        fail(f"{_origin(str(error), config, overrides)}: {error}")
    try:  # one comparison at a time in a folder; re-running it resumes (nothing is cleared)
        run_dir_claim(out)
    except RunDirError as error:
        fail(str(error))
    cores = simulation_cpus()
    cpus = max(1, cores // jobs)
    cells = grid.Grid(config.resolve(), overrides or [], out, runs, expected, jobs, cpus, audit)
    reused = sum(grid.reusable(cells.run_dir(r), expected[r]) for r in runs)
    console.print(f"privet compare: {len(runs)} runs ({', '.join(chosen)} level × "
                  f"ε {','.join(f'{e:g}' for e in eps)} × {seeds} seed(s)), {reused} already "
                  f"done; {jobs} at a time × {cpus} CPU(s) → {out}")
    if jobs > cores:
        err.print(f"privet: warning: --jobs {jobs} > {cores} cores; runs will share cores")
    started = time.time()
    code = 0
    try:
        with stop_signals():
            if not grid.run_grid(cells, console):
                code = 1
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the runs were stopped
        code = exit_code(stop)
    dirs = [cells.run_dir(r) for r in runs if (cells.run_dir(r) / results.CONFIG).is_file()]
    if dirs:
        built = report.build(dirs, out)
        print_comparison(built)
        for line in built.warnings:
            err.print(f"privet: warning: {line}", soft_wrap=True)
        console.print(f"report: {out / report.HTML}  ({time.time() - started:.0f}s)")
    if code:
        failed = [r.name for r in runs if cells.state.get(r) != "done"]
        err.print(f"privet: {len(failed)} run(s) did not finish: {', '.join(failed)}; "
                  "re-run the same command to retry them")
        raise typer.Exit(code)


@app.command()
def report(
    paths: Annotated[list[Path], typer.Argument(
        help="run directories, or a compare directory (its runs/ are used)")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="where to write the report",
        show_default="the compare directory, when one is given")] = None,
) -> None:
    """Rebuild compare.csv, summary.md, the plots and report.html from finished runs.

    Nothing is trained: level, ε and seed come from each run's config.toml, audit results
    from its audit.json when present.

    Examples:

      privet report runs/compare-adult

      privet report runs/a runs/b runs/no-dp --out runs/ab-report
    """
    from privet.experiments import report as reporting

    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        fail(f"not found: {', '.join(missing)}")
    if out is None:
        if len(paths) == 1 and (paths[0] / "runs").is_dir():
            out = paths[0]
        else:
            fail("give --out DIR (only a single compare directory is its own default)")
    dirs = reporting.find_run_dirs(paths)
    if not dirs:
        fail(f"no run directories (with {results.CONFIG}) in {', '.join(map(str, paths))}")
    from privet.experiments import drift_compare

    if all(drift_compare.is_drift_run(d) for d in dirs):  # drift mode: policies, not ε
        try:
            page = drift_compare.report_runs(dirs, out)
        except ValueError as error:
            fail(str(error))
        console.print((out / "drift_compare.md").read_text(), markup=False)
        console.print(f"{len(dirs)} drift run(s); report: {page}")
        return
    if any(drift_compare.is_drift_run(d) for d in dirs):
        fail("drift runs and fixed-data runs cannot share one report: give them apart")
    try:
        built = reporting.build(dirs, out)
    except ValueError as error:
        fail(str(error))
    print_comparison(built)
    for line in built.warnings:  # runs that differ in more than level, ε and seed
        err.print(f"privet: warning: {line}", soft_wrap=True)
    console.print(f"{len(dirs)} run(s); report: {out / reporting.HTML}")


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (finished or running)")],
    file: Annotated[Path, typer.Argument(
        help="rows to score: CSV/TSV/Parquet (gzipped text too) with the run's feature "
             "columns; image runs: an image or a folder of images")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="CSV to write, one row per input row (never over a file privet "
                            "predict did not write)")] = Path("predictions.csv"),
) -> None:
    """Score new rows with a run's model, cleaned and encoded as its training rows were.

    Writes one row per input row: its row number (and line), the predicted class and the
    probability of each class, or the prediction in the label's units (regression). A label
    column, if the file has one, is not used to predict: the accuracy on it (regression:
    RMSE, MAE, R²) is printed. Needs only the run directory: the encoding (the shared
    transform fitted with DP) and the model's inputs are saved in it (model.json).

    Examples:

      privet predict runs/a privet/common/data/adult/adult.test.gz --out runs/a-test.csv

      privet predict runs/a new-customers.parquet
    """
    from privet.common import predict as scoring
    from privet.common.data.tables import DataError

    try:
        scoring.check_out(out, file)
        predictor = scoring.Predictor(run_dir)
        scored = predictor.score_file(file)
        scoring.write(scored.table, out)
    except (scoring.PredictError, DataError) as error:
        fail(str(error))
    for note in scored.notes:
        err.print(f"privet: note: {note}", soft_wrap=True)
    summary = results.read_summary(run_dir)
    say(f"privet predict: {len(scored.table)} row(s) of {file} scored with the model of "
        f"{run_dir} (round {summary.get('rounds')}) → {out}")
    scores = scored.scores
    if scores is None:
        return
    named = f"label column {predictor.spec.label!r}" if predictor.spec.data == "table" \
        else "class subfolders"
    if predictor.spec.regression:
        reported = (summary.get("scores") or {}).get("test_rmse")
        say(f"RMSE {scores['rmse']:.6g}, MAE {scores['mae']:.6g}, R² {scores['r2']:.6f} in the "
            f"label's units, over {scores['rows']} labelled row(s) ({named})"
            + (f"; the run's test RMSE: {reported:.6g}" if reported is not None else ""))
        return
    reported = summary.get("accuracy")
    which = ("held-out accuracy (its clients' own rows)" if summary.get("evaluation") ==
             "federated" else "test accuracy")
    say(f"accuracy {scores['accuracy']:.6f} ({scores['correct']} of {scores['rows']} labelled "
        f"row(s), {named})" + (f"; the run's {which}: {reported:.6f}"
                               if reported is not None else ""))


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="a run directory (finished or running)")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", help="program to write (never over a file privet export did not "
                            "write)")] = Path("model.pt2"),
) -> None:
    """Export a run's model with torch.export, for serving it without privet.

    The program takes encoded rows, float32 (N, *input shape), any N, and returns logits
    (regression: the scaled target); load it with torch.export.load(PATH).module(). The
    encoding (the shared transform), the classes and the target's scale ride along in it
    as the extra file privet.json (the run's model.json); `privet predict` does the
    encoding for you.

    Example:

      privet export runs/a --out runs/a/model.pt2
    """
    from privet.common import saved_model
    from privet.common.models import ModelError

    if not (run_dir / results.SUMMARY).is_file() or not (run_dir / results.CONFIG).is_file():
        fail(f"{run_dir}: not a privet run directory (no {results.SUMMARY} and "
             f"{results.CONFIG})")
    if out.is_dir() or out.suffix != ".pt2":
        fail(f"--out {out}: expected the path of a file ending in .pt2 (torch.export's "
             "archive)")
    if out.exists() and not saved_model.exported_by_privet(out):
        fail(f"--out {out}: exists and was not written by privet export; choose another path "
             "(privet never writes over a file it did not write)")
    if not (run_dir / results.MODEL).is_file():
        fail(f"{run_dir}: no {results.MODEL}: no round has finished yet")
    from privet.common.data.tables import DataError

    try:
        cfg = load_config(run_dir / results.CONFIG)
        spec = saved_model.read(run_dir, cfg)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as error:
        fail(str(error))
    try:
        done = saved_model.export(cfg, spec, run_dir, out)
    except ModelError as error:
        fail(str(error))
    except OSError as error:
        fail(f"--out {out}: cannot write ({(error.strerror or str(error)).lower()})")
    except Exception as error:  # noqa: BLE001 - torch.export's many kinds: one line
        reason = str(error).strip().splitlines()[0] if str(error).strip() else \
            type(error).__name__
        fail(f"{run_dir}: torch.export cannot export train.model = {cfg.train.model!r}: "
             f"{reason}")
    takes = ", ".join(map(str, spec.input_shape))
    gives = "the scaled target z (y = center + half·z: privet.json's target)" \
        if spec.regression else f"logits over {', '.join(spec.classes)}"
    say(f"privet export: the model of {run_dir} (round {done}) → {out}: float32 (N, {takes}) "
        f"in, {gives} out" + (f"; rows encoded with the {spec.encoding} transform in its "
                              "privet.json" if spec.transform else
                              "; each client encoded its rows its own way: no shared "
                              "transform (privet predict refuses this run)"
                              if spec.encoding == "per-client" else ""))


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="a finished run directory")],
    max_rows: Annotated[int, typer.Option(min=1, help="rows audited (members + non-members)")
                        ] = 5000,
    seed: Annotated[int, typer.Option(help="seed of the audit's sampling")] = 0,
) -> None:
    """Membership-inference audit of a run: an empirical lower bound on its ε.

    Writes RUN_DIR/audit.json. A violation (lower bound above the accounted ε) means the
    privacy accounting or its implementation is wrong.

    Example:

      privet audit runs/a
    """
    if not (run_dir / results.SUMMARY).is_file():
        fail(f"{run_dir}: not a run directory (no {results.SUMMARY})")
    from privet.common.audit import audit_run

    try:
        found = audit_run(run_dir, max_rows=max_rows, seed=seed)
    except (ValueError, FileNotFoundError) as error:  # the run cannot be audited: say why
        fail(f"{run_dir}: audit: {error}")
    table = Table(title=f"audit · {run_dir}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    tpr = found.get("tpr_at_fpr") or {}
    for name, value in (("AUC", found.get("auc")), ("TPR at 1% FPR", tpr.get("0.01")),
                        ("TPR at 0.1% FPR", tpr.get("0.001")),
                        ("ε lower bound (empirical)", found.get("epsilon_lower_bound")),
                        ("ε accounted", found.get("theoretical_epsilon"))):
        table.add_row(name, "-" if value is None else f"{value:.4g}")
    violation = bool(found.get("violation"))
    table.add_row("violation", Text("YES", style="bold red") if violation else "no")
    console.print(table)
    if found.get("message"):
        console.print(str(found["message"]), markup=False,
                      style="bold red" if violation else None)


def print_comparison(built) -> None:
    """The summary over seeds; rows with an audit violation in red. Logs (no terminal, 80
    columns) get the Markdown table: a wide rich table would be folded unreadably there."""
    from privet.experiments.report import markdown

    if not console.is_terminal:
        console.print(markdown(built.header, built.body), markup=False, end="", soft_wrap=True)
        return
    table = Table(title="privet compare · mean ± std over seeds")
    for i, name in enumerate(built.header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for cells in built.body:
        flagged = cells[-1] not in ("–", "0")
        table.add_row(*cells, style="bold red" if flagged else None)
    console.print(table)


def _mark(run_dir: Path, status: str) -> None:
    """Record how a run ended when the server could not (it was cut off). Best effort: on a
    full disk the finished rounds stay as they were written."""
    from privet.common.plots import plot_run
    from privet.server.recorder import mark_ended

    path = run_dir / results.SUMMARY
    try:
        mark_ended(run_dir, status)
        plot_run(run_dir)
    except (OSError, ValueError) as error:
        err.print(f"privet: warning: could not mark {path} {status}: {error}", soft_wrap=True)
    from privet.server.tracking import end_open

    end_open(run_dir, status)  # MLflow: the run KILLED or FAILED, with the files so far


# --- deployment: SuperLink and SuperNodes on separate machines ----------------------------

app.command("run")(run_deployed)
app.command("ledger")(ledger)
app.add_typer(deploy_app, name="deploy")


@app.command("flwr", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def flwr_operator_cli(ctx: typer.Context) -> None:
    """Flower's flwr CLI, presenting your operator certificate: privet flwr ls lab, ...

    The certificate is the one `privet deploy connection --operator-cert` recorded for the
    connection's address; commands, options and output are flwr's."""
    from privet.experiments import flwr_operator

    flwr_operator.main(list(ctx.args))  # main() dispatches here first; this is for --help


def main() -> None:
    if sys.argv[1:2] == ["flwr"]:  # `privet flwr ARGS`: Flower's CLI with the operator cert
        from privet.experiments import flwr_operator

        flwr_operator.main(sys.argv[2:])
        return
    from privet import patches

    try:  # privet's accounting runs in this process (planning, preflight, ledgers)
        patches.install("dp-accounting")
    except patches.PatchError as error:
        print(f"privet: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    app()


if __name__ == "__main__":
    main()
