"""The `privet` command: `privet simulate --config FILE --set key=value --out DIR`."""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from common import results
from common.config import DEFAULT_CONFIG, ConfigError, ExperimentConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="privet: federated learning with differential privacy, simulated.")
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


@app.callback()
def _group() -> None:
    """privet: federated learning with differential privacy, simulated."""


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]privet: error:[/] {message}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class RoundWatcher(threading.Thread):
    """Reports each finished round by reading the run directory the server writes."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig) -> None:
        super().__init__(daemon=True)
        self.run_dir, self.cfg = run_dir, cfg
        self.stop = threading.Event()
        self.reported = 0
        self.started = time.time()

    def poll(self) -> None:
        try:
            rows = results.read_csv(self.run_dir / results.ROUNDS)
        except (FileNotFoundError, OSError):
            return
        for row in rows[self.reported:]:
            eps = row["max_epsilon"] or "-"
            console.print(f"round {int(row['round']):>3}/{self.cfg.rounds}  "
                          f"test accuracy {float(row['test_accuracy']):.4f}  "
                          f"max ε {eps:>8}  clients {row['clients_trained']:>3}  "
                          f"{time.time() - self.started:6.1f}s")
        self.reported = len(rows)

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.poll()
        self.poll()


def print_summary(run_dir: Path) -> None:
    summary = results.read_summary(run_dir)
    privacy = summary["privacy"]
    table = Table(title=f"privet · {summary['name']} · {summary['status']}")
    table.add_column("client", justify="right")
    table.add_column("ε spent", justify="right")
    table.add_column("rounds trained", justify="right")
    table.add_column("stopped", justify="right")
    for cid, c in privacy["clients"].items():
        eps = "∞ (no DP)" if c["epsilon"] is None else f"{c['epsilon']:.4f}"
        table.add_row(cid, eps, str(c["rounds_trained"]), str(c["stopped_round"] or "-"))
    console.print(table)
    target = privacy["target_epsilon"]
    level = privacy["level"]
    eps_line = ("no differential privacy" if level == "none" else
                f"max ε {privacy['max_epsilon']:.4f} of target {target} at δ = "
                f"{privacy['delta']:g} ({privacy['accountant']}, {level}-level)")
    accuracy = summary["accuracy"]
    console.print(f"test accuracy [bold]{accuracy:.4f}[/] after {summary['rounds']} round(s); "
                  f"{eps_line}; {summary['wall_seconds']:.1f}s" if accuracy is not None else
                  f"no round finished; {eps_line}")
    console.print(f"results: {run_dir}")


@app.command()
def simulate(
    config: Annotated[Path, typer.Option("--config", "-c", help="experiment TOML file")
                      ] = DEFAULT_CONFIG,
    overrides: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", help="override a key, e.g. --set privacy.epsilon=1 (repeatable)")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", help="run directory (default runs/<name>-<timestamp>)")] = None,
    overwrite: Annotated[bool, typer.Option(help="reuse a run directory that holds a run")
                         ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower's logs")
                       ] = False,
) -> None:
    """Run an experiment on Flower's simulation runtime and write its results."""
    try:
        cfg = load_config(config, overrides or [])
    except ConfigError as error:
        fail(str(error))
    run_dir = (out or default_run_dir(cfg)).resolve()
    if (run_dir / results.SUMMARY).exists() and not overwrite:
        fail(f"{run_dir} already holds a run; pass another --out or --overwrite")
    run_dir.mkdir(parents=True, exist_ok=True)
    for stale in results.RUN_FILES:
        (run_dir / stale).unlink(missing_ok=True)
    results.atomic_write_text(run_dir / results.CONFIG, cfg.to_toml())
    privacy = (f"ε = {cfg.privacy.epsilon} per client, δ = {cfg.privacy.delta:g}"
               if cfg.private else "no differential privacy")
    console.print(f"privet: {cfg.name}: {cfg.num_clients} clients, {cfg.clients_per_round} "
                  f"per round, {cfg.rounds} rounds, {privacy} → {run_dir}")

    from experiments import simulation  # heavy imports (torch, flwr, ray) only now

    watcher = RoundWatcher(run_dir, cfg)
    watcher.start()
    code = 0
    try:
        simulation.run(cfg, run_dir, verbose=verbose)
    except KeyboardInterrupt:
        code = 130
        err.print("privet: interrupted; finished rounds are kept")
        _mark(run_dir, "interrupted")
    except Exception as error:  # noqa: BLE001 - one line for the user, details with -v
        code = 1
        _mark(run_dir, "failed")
        err.print(f"privet: error: the simulation failed: {error}")
        if verbose:
            raise
    finally:
        watcher.stop.set()
        watcher.join(timeout=5)
    if (run_dir / results.SUMMARY).exists():
        print_summary(run_dir)
    if code:
        _exit_now(code)


def _mark(run_dir: Path, status: str) -> None:
    """Record how a run ended when the server could not (it was cut off)."""
    from common.plots import plot_run

    path = run_dir / results.SUMMARY
    if path.exists():
        summary = json.loads(path.read_text())
        if summary.get("status") == "running":
            summary["status"] = status
            results.write_json(path, summary)
    plot_run(run_dir)


def _exit_now(code: int) -> None:
    """Leave without waiting for Flower's ServerApp thread, which may still be blocked."""
    sys.stdout.flush()
    sys.stderr.flush()
    import os

    os._exit(code)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
