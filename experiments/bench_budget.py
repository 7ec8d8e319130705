"""`privet budget` at cross-device scale against dp-accounting's PLD called directly.

    python -m experiments.bench_budget [--users 1000000] [--cohort 1000] [--rounds 10000]
                                       [--sigma 1] [--epsilon 1,2,4,8] [--delta 1e-5]
                                       [--repeats 3] [--accountant pld] [--calibrate]

The issue's plan (18, item 3): user-level DP with 10^6 participants, 10^3 a round, 10^4
rounds, answered in ≤ 10 s with the PLD accountant, within 1% of dp-accounting's PLD at its
default discretisation (1e-4).

privet: whole `privet budget` processes (`python -m privet.experiments.cli budget
--users … --cohort … --rounds …`, both the --sigma and the --epsilon form, with
--accountant pld by default), each with an empty PRIVET_CACHE_DIR, timed wall-clock from
start to exit (imports and the PNG included); the median and the slowest of --repeats runs.
Values are read from the printed table (ε to 4 decimals; σ rounded up to 4 decimals).

dp-accounting, in this process (which imports no privet module, so none of privet's
speed-ups of dp-accounting are installed): `PLDAccountant(value_discretization_interval=
1e-4)` composing `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(σ)),
rounds)`, then `get_epsilon(δ)`: the reference ε for --sigma, and ε at each σ privet printed
for --epsilon (whose relative difference to the target is shown: ≤ 0 means the target is
met). With --calibrate, also dp-accounting's own search for σ
(`mechanism_calibration.calibrate_dp_mechanism`, the same accountant, tolerance 1e-3·σ,
bracketed by ×0.8 and ×1.25 privet's σ: a head start, as its default search from small σ
runs out of memory at this scale), one target at a time: slow, for the time comparison.

Speed targets are checked here, by eye, never in timed tests.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant

PROJECT_DIR = Path(__file__).resolve().parent.parent
GRID = 1e-4  # dp-accounting's default value_discretization_interval


def reference_epsilon(sigma: float, q: float, rounds: int, delta: float) -> float:
    """dp-accounting's PLD, called as its documentation shows, at its default grid."""
    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=GRID)
    accountant.compose(dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds))
    return float(accountant.get_epsilon(delta))


def reference_sigma(target: float, q: float, rounds: int, delta: float, near: float
                    ) -> float:
    """dp-accounting's own calibration of the noise multiplier (bisection on its PLD),
    bracketed by ×0.8 and ×1.25 the σ `near` privet found: a head start (its default search
    from small σ builds PLDs of tens of GiB at 10^4 rounds)."""
    from dp_accounting import mechanism_calibration

    return float(mechanism_calibration.calibrate_dp_mechanism(
        lambda: pld_privacy_accountant.PLDAccountant(value_discretization_interval=GRID),
        lambda s: dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(s)), rounds),
        target, delta, mechanism_calibration.ExplicitBracketInterval(0.8 * near, 1.25 * near),
        tol=1e-3 * near))


def run_budget(args: list[str]) -> tuple[float, str]:
    """One whole `privet budget` process: (wall seconds, stdout)."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "PRIVET_CACHE_DIR": cache,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT_DIR),
                                                          os.environ.get("PYTHONPATH")]))}
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "privet.experiments.cli", "budget", *args,
                               "--out", str(Path(cache) / "budget.png")],
                              cwd=PROJECT_DIR, env=env, capture_output=True, text=True,
                              timeout=600)
        wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"privet budget {' '.join(args)} failed:\n{done.stderr}")
    return wall, done.stdout


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of each row of the table privet printed."""
    return [[c.strip() for c in line.strip().strip("│").split("│")]
            for line in stdout.splitlines() if re.match(r"^\s*│\s*[\d.]+\s*│", line)]


def timed(args: list[str], repeats: int) -> tuple[list[float], str]:
    walls, stdout = [], ""
    for _ in range(repeats):
        wall, stdout = run_budget(args)
        walls.append(wall)
    return walls, stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--cohort", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10_000)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--epsilon", default="1,2,4,8")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--accountant", default="pld",
                        help="privet budget's --accountant (pld: the issue's target)")
    parser.add_argument("--calibrate", action="store_true",
                        help="also time dp-accounting's own σ calibration (minutes)")
    opts = parser.parse_args()
    q = opts.cohort / opts.users
    plan = ["--users", str(opts.users), "--cohort", str(opts.cohort), "--rounds",
            str(opts.rounds), "--delta", repr(opts.delta), "--accountant", opts.accountant]
    print(f"plan: {opts.users:,} users, {opts.cohort:,} a round (q = {q:g}), {opts.rounds:,} "
          f"rounds, δ = {opts.delta:g}; privet: whole `privet budget` processes "
          f"(--accountant {opts.accountant}), median and slowest of {opts.repeats}; "
          f"dp-accounting: PLDAccountant at its default grid {GRID:g}, in this process\n")

    walls, stdout = timed([*plan, "--sigma", repr(opts.sigma)], opts.repeats)
    ours = float(table_rows(stdout)[-1][1])
    start = time.perf_counter()
    theirs = reference_epsilon(opts.sigma, q, opts.rounds, opts.delta)
    ref_time = time.perf_counter() - start
    print(f"--sigma {opts.sigma:g}: ε after {opts.rounds:,} rounds")
    print(f"  privet budget      {statistics.median(walls):6.2f} s (slowest "
          f"{max(walls):.2f} s)   ε = {ours:.4f}")
    print(f"  dp-accounting PLD  {ref_time:6.2f} s                   ε = {theirs:.4f}")
    print(f"  relative difference {ours / theirs - 1:+.3%} (privet's ε printed to 4 "
          "decimals)\n")

    walls, stdout = timed([*plan, "--epsilon", opts.epsilon], opts.repeats)
    print(f"--epsilon {opts.epsilon}: σ for the whole run; privet budget "
          f"{statistics.median(walls):.2f} s (slowest {max(walls):.2f} s)")
    print(f"  {'target ε':>8}  {'σ privet':>8}  {'dp-acc. ε at σ':>14}  {'time':>6}  "
          f"{'vs target':>9}" + ("  σ dp-acc.  time" if opts.calibrate else ""))
    for row in table_rows(stdout):
        target, sigma = float(row[0]), float(row[1])
        start = time.perf_counter()
        spent = reference_epsilon(sigma, q, opts.rounds, opts.delta)
        ref_time = time.perf_counter() - start
        line = (f"  {target:>8g}  {sigma:>8.4f}  {spent:>14.4f}  {ref_time:>5.2f}s  "
                f"{spent / target - 1:>+9.3%}")
        if opts.calibrate:
            start = time.perf_counter()
            found = reference_sigma(target, q, opts.rounds, opts.delta, sigma)
            line += f"  {found:>9.4f}  {time.perf_counter() - start:5.1f}s"
        print(line)
    if not math.isfinite(ours):
        raise SystemExit("privet's ε is not finite")


if __name__ == "__main__":
    main()
