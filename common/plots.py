"""Plots drawn from a run directory's CSV files (so they work for interrupted runs too)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common import results  # noqa: E402


def plot_run(run_dir: Path) -> Path | None:
    """Test accuracy and the largest client ε over rounds, side by side."""
    run_dir = Path(run_dir)
    try:
        rows = results.read_csv(run_dir / results.ROUNDS)
    except FileNotFoundError:
        return None
    if not rows:
        return None
    rounds = [int(r["round"]) for r in rows]
    accuracy = [float(r["test_accuracy"]) for r in rows]
    epsilon = [float(r["max_epsilon"]) if r["max_epsilon"] not in ("", "inf") else math.nan
               for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(rounds, accuracy, marker="o")
    left.set(xlabel="round", ylabel="test accuracy", title="Global model on the test set")
    left.grid(alpha=0.3)
    if all(math.isnan(e) for e in epsilon):
        right.text(0.5, 0.5, "no differential privacy", ha="center", va="center")
        right.set_axis_off()
    else:
        right.plot(rounds, epsilon, marker="o", color="tab:red")
        target = _target_epsilon(run_dir)
        if target is not None:
            right.axhline(target, color="grey", linestyle="--", label=f"target ε = {target:g}")
            right.legend(loc="lower right")
        right.set(xlabel="round", ylabel="ε (largest over clients)",
                  title="Privacy spent so far (cumulative)")
        right.grid(alpha=0.3)
    for axis in (left, right):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    path = run_dir / results.PLOT
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def _target_epsilon(run_dir: Path) -> float | None:
    try:
        return results.read_summary(run_dir)["privacy"]["target_epsilon"]
    except (OSError, ValueError, KeyError):
        return None
