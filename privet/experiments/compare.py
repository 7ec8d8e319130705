"""`privet compare`: one simulation per level × ε × seed, then the comparison report.

Every run is its own `privet simulate` subprocess: Ray is per process, so a crashed or
interrupted run cannot take the others down, and runs can go in parallel. Re-running the
same command resumes: a run whose directory holds a finished summary.json and the same
resolved config is reused; a stopped one (interrupted, killed, failed) with the same config
and a checkpoint goes on from its last finished round (`privet simulate --resume`); anything
else (changed, stopped before round 1 ended) is run again.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.markup import escape

from privet.common import results
from privet.experiments.lifetime import die_with_parent
from privet.common import run_dir as run_dirs
from privet.common.config import ExperimentConfig, TrackingConfig, load_config
from privet.experiments import report
from privet.experiments.simulation import CPUS_ENV
from privet.server.tracking import configured, sync_finished_run

LEVELS = ("sample", "user")
LOG = "simulate.log"        # a run's console output, next to its results
AUDIT_LOG = "audit.log"


@dataclass(frozen=True)
class GridRun:
    level: str      # sample | user | none (the non-private baseline)
    epsilon: float  # target; inf for none
    seed: int

    @property
    def name(self) -> str:
        return f"{self.level}-eps{self.epsilon:g}-seed{self.seed}"

    def overrides(self) -> list[str]:
        """The --set values that make this run; they come after the user's, so they win."""
        eps = "inf" if math.isinf(self.epsilon) else repr(float(self.epsilon))
        privacy = {"sample": ["privacy.level=sample", f"privacy.epsilon={eps}"],
                   "user": ["privacy.level=user", f"privacy.user-epsilon={eps}"],
                   "none": ["privacy.level=none"]}[self.level]
        return [*privacy, f"seed={self.seed}"]


def parse_epsilons(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--epsilons {text!r}: expected numbers separated by commas, "
                         "e.g. 0.5,1,2,4,8,inf") from None
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"--epsilons {text!r}: every ε must be > 0 (inf = no DP)")
    return list(dict.fromkeys(values))


def parse_levels(text: str) -> list[str]:
    levels = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    unknown = [v for v in levels if v not in LEVELS]
    if not levels or unknown:
        raise ValueError(f"--levels {text!r}: expected a comma-separated subset of "
                         f"{','.join(LEVELS)}")
    return levels


def grid(base_seed: int, levels: list[str], epsilons: list[float], seeds: int
         ) -> list[GridRun]:
    """Seed by seed, so a grid stopped early has every budget for the first seeds; the
    non-private baseline once per seed (it does not depend on the level)."""
    runs = []
    for seed in range(base_seed, base_seed + seeds):
        if any(math.isinf(e) for e in epsilons):
            runs.append(GridRun("none", math.inf, seed))
        runs += [GridRun(level, e, seed) for level in levels for e in epsilons
                 if math.isfinite(e)]
    return runs


def _comparable(cfg: ExperimentConfig) -> str:
    """The config as a finished run must match it: where results go (the run directory,
    `[tracking]`) does not count."""
    privacy = cfg.privacy
    if privacy.ledger_dir:  # simulate stores it absolute
        privacy = dataclasses.replace(
            privacy, ledger_dir=str(Path(privacy.ledger_dir).expanduser().resolve()))
    return dataclasses.replace(cfg, out_dir="", privacy=privacy,
                               tracking=TrackingConfig()).to_toml()


def reusable(run_dir: Path, expected: ExperimentConfig) -> bool:
    try:
        status = results.read_summary(run_dir).get("status")
        done = load_config(run_dir / results.CONFIG)
    except (OSError, ValueError):  # ConfigError is a ValueError
        return False
    return status in report.FINISHED and _comparable(done) == _comparable(expected)


def resumable(run_dir: Path, expected: ExperimentConfig) -> bool:
    """A stopped run of the same config that `privet simulate --resume` can continue."""
    if not (run_dir / results.CHECKPOINT).is_file():
        return False
    try:
        done = load_config(run_dir / results.CONFIG)
    except (OSError, ValueError):
        return False
    try:
        status = results.read_summary(run_dir).get("status")
    except (OSError, ValueError):
        status = None  # killed before its first summary: the checkpoint says where it is
    return status not in report.FINISHED and _comparable(done) == _comparable(expected)


def rounds_done(run_dir: Path) -> int:
    try:
        with open(run_dir / results.ROUNDS, encoding="utf-8") as handle:
            return max(0, sum(1 for _ in handle) - 1)
    except OSError:
        return 0


class Grid:
    """Runs the grid's subprocesses (up to `jobs` at a time) and tracks their state."""

    def __init__(self, config: Path, overrides: list[str], out: Path, runs: list[GridRun],
                 expected: dict[GridRun, ExperimentConfig], jobs: int, cpus: int,
                 audit: bool) -> None:
        self.config, self.overrides, self.out = config, overrides, out
        self.runs, self.expected, self.jobs, self.audit = runs, expected, jobs, audit
        self.env = {**os.environ, CPUS_ENV: str(cpus)}
        self.state: dict[GridRun, str] = {}   # running | auditing | done | failed | ...
        self.outcome: dict[GridRun, str] = {}  # one line per finished run
        self.resumed: dict[GridRun, int] = {}  # runs resumed, after how many rounds
        self.procs: dict[GridRun, subprocess.Popen] = {}
        self.stopping = threading.Event()
        self.lock = threading.Lock()

    def run_dir(self, run: GridRun) -> Path:
        return self.out / "runs" / run.name

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "privet.experiments.cli", *args]

    def _spawn(self, run: GridRun, args: list[str], log: Path, append: bool = False) -> int:
        with self.lock:
            if self.stopping.is_set():
                return 130
            with open(log, "a" if append else "w", encoding="utf-8") as handle:
                # a run ends with this process, even if this one is killed (SIGKILL)
                proc = subprocess.Popen(self.command(*args), stdout=handle,
                                        stderr=subprocess.STDOUT, env=self.env,
                                        preexec_fn=die_with_parent)
            self.procs[run] = proc
        try:
            return proc.wait()
        finally:
            with self.lock:
                self.procs.pop(run, None)

    def simulate(self, run: GridRun) -> bool:
        run_dir = run_dirs.mark(self.run_dir(run))  # privet's: its simulate may claim it
        if resumable(run_dir, self.expected[run]):  # its finished rounds are kept
            self.resumed[run] = rounds_done(run_dir)
            args = ["simulate", "--resume", str(run_dir)]
        else:
            for stale in (results.ROUNDS, results.SUMMARY, results.AUDIT):  # a redo: clean
                (run_dir / stale).unlink(missing_ok=True)
            sets = [a for o in [*self.overrides, *run.overrides()] for a in ("--set", o)]
            args = ["simulate", "--config", str(self.config), *sets, "--out", str(run_dir),
                    "--overwrite"]
        self.state[run] = "running"
        code = self._spawn(run, args, run_dir / LOG, append=run in self.resumed)
        return code == 0 and reusable(run_dir, self.expected[run])

    def run_audit(self, run: GridRun) -> bool:
        self.state[run] = "auditing"
        run_dir = self.run_dir(run)
        code = self._spawn(run, ["audit", str(run_dir)], run_dir / AUDIT_LOG)
        return code == 0 and (run_dir / results.AUDIT).is_file()

    def execute(self, run: GridRun, reuse: bool) -> None:
        try:
            self._execute(run, reuse)
        except Exception as error:  # noqa: BLE001 - one broken cell must not end the grid
            self.state[run] = "failed"
            self.outcome[run] = f"[red]✗ {run.name} failed: {escape(str(error))}[/]"

    def _execute(self, run: GridRun, reuse: bool) -> None:
        """One grid cell: simulate unless reusable, then audit unless already audited."""
        run_dir = self.run_dir(run)
        started = time.time()
        if not reuse and not self.simulate(run):
            self.state[run] = "interrupted" if self.stopping.is_set() else "failed"
            self.outcome[run] = (f"[red]✗ {run.name} {self.state[run]}[/] "
                                 f"(log: {escape(str(run_dir / LOG))})")
            return
        audit_note = ""
        regression = self.expected[run].regression  # not audited (common.audit refuses it)
        if self.audit and not regression and not (run_dir / results.AUDIT).is_file() \
                and not self.stopping.is_set():
            if not self.run_audit(run):
                audit_note = f"  [yellow]audit failed (log: {escape(str(run_dir / AUDIT_LOG))})[/]"
        if configured(self.expected[run]):  # a reused run, the audit: each logged once
            for line in sync_finished_run(run_dir, self.expected[run]):
                audit_note += f"  [yellow]{escape(line)}[/]"
        row = report.audit_columns(run_dir)
        summary = results.read_summary(run_dir)
        verb = "reused" if reuse else f"done in {time.time() - started:.0f}s" + (
            f" (resumed after round {self.resumed[run]})" if run in self.resumed else "")
        auc = f"  audit AUC {float(row['auc']):.3f}" if row.get("auc") else ""
        if row.get("audit_violation") == "true":
            auc += "  [bold red]AUDIT VIOLATION[/]"
        if regression:
            scores = summary.get("scores") or {}
            shown = " ".join(f"{name} " + ("-" if scores.get(key) is None
                                          else f"{scores[key]:.4g}")
                             for name, key in (("RMSE", "test_rmse"), ("R²", "test_r2")))
        else:
            accuracy = summary.get("accuracy")
            shown = "accuracy " + ("-" if accuracy is None else f"{accuracy:.4f}")
        self.outcome[run] = (f"[green]✓[/] {run.name:<24} {shown}"
                             f"{auc}  {verb}{audit_note}")
        self.state[run] = "done"

    def interrupt(self) -> None:
        """Stop starting runs; the running ones saw the terminal's Ctrl-C themselves and mark
        their summary interrupted. Ask again, then force, if they linger."""
        self.stopping.set()
        for sig, wait in ((None, 10), (signal.SIGINT, 30), (signal.SIGKILL, 5)):
            with self.lock:
                procs = list(self.procs.values())
            deadline = time.time() + wait
            for proc in procs:
                if sig is not None and proc.poll() is None:
                    proc.send_signal(sig)
            while any(p.poll() is None for p in procs) and time.time() < deadline:
                time.sleep(0.2)


def run_grid(grid_: Grid, console) -> bool:
    """Run every cell with a progress display; True when every run finished."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    reuse = {run: reusable(grid_.run_dir(run), grid_.expected[run]) for run in grid_.runs}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        overall = progress.add_task("runs", total=len(grid_.runs))
        current: dict[GridRun, int] = {}
        with ThreadPoolExecutor(max_workers=grid_.jobs) as pool:
            futures = {pool.submit(grid_.execute, run, reuse[run]): run for run in grid_.runs}
            try:
                while futures:
                    for future in [f for f in futures if f.done()]:
                        run = futures.pop(future)
                        if run in current:
                            progress.remove_task(current.pop(run))
                        progress.console.print(grid_.outcome.get(run, escape(run.name)),
                                               markup=True)
                        progress.advance(overall)
                    _show_current(progress, grid_, current)
                    time.sleep(0.3)
            except KeyboardInterrupt:
                progress.console.print("privet: interrupted; stopping the runs in progress "
                                       "(re-run the same command to resume)")
                grid_.interrupt()
                for future in futures:
                    future.cancel()
                raise
    return all(grid_.state.get(run) == "done" for run in grid_.runs)


def _show_current(progress, grid_: Grid, current: dict) -> None:
    """One bar per run in progress: its rounds so far (or that it is being audited)."""
    for run, state in list(grid_.state.items()):
        if state not in ("running", "auditing"):
            continue
        planned = grid_.expected[run].rounds
        if run not in current:
            current[run] = progress.add_task(run.name, total=planned)
        label = f"  {run.name} " + ("auditing" if state == "auditing" else "round")
        progress.update(current[run], description=label,
                        completed=rounds_done(grid_.run_dir(run)))


def tracking_overrides(base: ExperimentConfig, out: Path) -> list[str]:
    """With `[tracking]` on and no `tracking.experiment`, the sweep's runs go to one
    experiment named after the comparison folder."""
    if not configured(base) or base.tracking.experiment:
        return []
    return [f"tracking.experiment={json.dumps(Path(out).name)}"]


def resolve(config: Path, overrides: list[str], runs: list[GridRun]
            ) -> dict[GridRun, ExperimentConfig]:
    """Each run's config, checked before anything starts (a bad key fails the whole grid)."""
    return {run: load_config(config, [*overrides, *run.overrides()]) for run in runs}

