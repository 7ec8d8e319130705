"""Cross-device scale: experiments/configs/cross-device.toml (100,000 clients, 100 per round).

    python -m experiments.bench_scale [--level sample|user] [--rounds 50] [--ray-address A]

Runs `privet simulate` on the config as a whole process and, while it runs, samples twice a
second the proportional set size (PSS) of its whole process tree (driver, fork server, pool
workers; with --ray-address, also every Ray worker process on this machine, `ray::*`: the
client actors). Prints:

- peak PSS, and the peak while each number of rounds was done (it should not grow);
- start-up: from launch to the end of round 1 (start-up plus one round: an upper bound);
- each round's time from rounds.csv (its clock), round 5 and round 50 side by side, and the
  median of rounds 2-10 against the median of the last 10;
- the share of wall time the clients spent on privacy accounting (noise calibration and ε
  queries, from metrics.csv, divided by the workers running at once);
- how many lines the console printed, and the final accuracy and ε.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from experiments.bench import _cores, _descendants, _pss_kib, _rows
from privet.common.config import PROJECT_DIR

CONFIG = PROJECT_DIR / "experiments" / "configs" / "cross-device.toml"
USER_LEVEL = ("privacy.level=\"user\"", "privacy.user-epsilon=3.0")


def _ray_workers() -> list[int]:
    """Ray's worker processes on this machine (their command line starts `ray::`)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read(5) == b"ray::":
                        found.append(int(entry))
            except OSError:
                continue
    return found


def run(level: str, rounds: int, keep: Path | None, ray_address: str | None,
        extra: list[str]) -> dict:
    root = keep or Path(tempfile.mkdtemp(prefix="privet-scale-"))
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / f"cross-device-{level}"
    command = [sys.executable, "-m", "privet.experiments.cli", "simulate", "--config",
               str(CONFIG), "--out", str(run_dir), "--overwrite", "--set", f"rounds={rounds}"]
    for assignment in (*(USER_LEVEL if level == "user" else ()), *extra):
        command += ["--set", assignment]
    if ray_address:
        command += ["--ray-address", ray_address]
    log_path = root / f"{level}.log"
    samples: list[tuple[float, int, int]] = []  # (seconds, rounds done, PSS KiB)
    first_round: list[float] = []
    stop = threading.Event()
    with open(log_path, "w") as log:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   cwd=PROJECT_DIR)

        def sample() -> None:
            while not stop.is_set():
                pids = set(_descendants(process.pid))
                if ray_address:
                    pids.update(_ray_workers())
                total = sum(_pss_kib(pid) for pid in pids)
                try:
                    done = len(_rows(run_dir / "rounds.csv"))
                except (OSError, csv.Error):
                    done = 0
                now = time.perf_counter() - start
                if done and not first_round:
                    first_round.append(now)
                samples.append((now, done, total))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
    if code:
        raise SystemExit(f"the run failed ({code}); see {log_path}")
    per_round = _rows(run_dir / "rounds.csv")
    clock = [float(r["elapsed_seconds"]) for r in per_round]
    durations = [b - a for a, b in zip([0.0, *clock], clock)]
    clients = _rows(run_dir / "metrics.csv")
    workers = max(1, min(_cores(), 100))
    accounting = sum(float(r["accounting_seconds"] or 0) for r in clients)
    summary = json.loads((run_dir / "summary.json").read_text())
    by_round: dict[int, int] = {}
    for _, done, kib in samples:
        by_round[done] = max(by_round.get(done, 0), kib)
    return {
        "level": level, "wall_s": wall, "status": summary["status"],
        "peak_pss_mib": max(s[2] for s in samples) / 1024,
        "pss_by_rounds_done": {r: kib / 1024 for r, kib in sorted(by_round.items())},
        "launch_to_round_1_s": first_round[0] if first_round else None,
        "round_s": durations,
        "accounting_share": accounting / workers / wall,
        "console_lines": len(log_path.read_text().splitlines()),
        "accuracy": summary["accuracy"], "max_epsilon": summary["privacy"].get("max_epsilon"),
        "user_epsilon": (summary["privacy"].get("user_level") or {}).get("epsilon"),
        "run_dir": str(run_dir),
    }


def report(result: dict) -> None:
    rounds = result["round_s"]
    print(f"{result['level']}-level, {len(rounds)} rounds: {result['status']} in "
          f"{result['wall_s']:.1f} s; accuracy {result['accuracy']:.4f}, max ε "
          f"{result['max_epsilon']}, user ε {result['user_epsilon']}")
    print(f"  peak PSS of the process tree {result['peak_pss_mib']:.0f} MiB; by rounds done: "
          + ", ".join(f"{r}: {m:.0f}" for r, m in result["pss_by_rounds_done"].items()
                      if r in (0, 1, 5, 10) or r % 10 == 0 or r == len(rounds)))
    print(f"  launch to end of round 1: {result['launch_to_round_1_s']:.1f} s")
    if len(rounds) >= 50:
        print(f"  round 5 {rounds[4]:.2f} s, round 50 {rounds[49]:.2f} s "
              f"(ratio {rounds[49] / rounds[4]:.2f})")
    early, late = rounds[1:10], rounds[-10:]
    print(f"  median round, rounds 2-10: {statistics.median(early):.2f} s; last 10: "
          f"{statistics.median(late):.2f} s (ratio "
          f"{statistics.median(late) / statistics.median(early):.2f})")
    print(f"  accounting: {100 * result['accounting_share']:.1f}% of wall time; console "
          f"{result['console_lines']} lines; run in {result['run_dir']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", choices=("sample", "user", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--keep", type=Path, help="write the runs here (default: a temp dir)")
    parser.add_argument("--ray-address", help="run the clients on this Ray cluster")
    parser.add_argument("--set", action="append", default=[], dest="extra",
                        help="another override, as privet simulate's --set (repeatable)")
    args = parser.parse_args()
    levels = ("sample", "user") if args.level == "both" else (args.level,)
    print(f"{_cores()} cores; {CONFIG.relative_to(PROJECT_DIR)}", flush=True)
    for level in levels:
        report(run(level, args.rounds, args.keep, args.ray_address, args.extra))


if __name__ == "__main__":
    main()
