"""Plots drawn from a run directory's CSV files (so they work for interrupted runs too)."""

from __future__ import annotations

import math
from pathlib import Path

from privet.common import results


# An executor whose workers have pyplot imported (the simulation's process pool, set while it
# runs): `draw` sends the plot there, sparing the run ~0.7 s of importing matplotlib at its
# end. Any other process draws it itself.
EXECUTOR = None


def draw(run_dir: Path) -> Path | None:
    """plot_run(run_dir), in EXECUTOR when one is set (waiting for it: the file exists when
    this returns), else here. Raises what plot_run raises."""
    executor = EXECUTOR
    if executor is not None:
        try:
            future = executor.submit(plot_run, Path(run_dir))
        except RuntimeError:  # shut down meanwhile
            return plot_run(run_dir)
        return future.result()
    return plot_run(run_dir)


def _pyplot():
    """matplotlib's pyplot (Agg) and MaxNLocator, imported when a plot is drawn (~0.45 s,
    which a run would otherwise pay before its first round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    return plt, MaxNLocator


def plot_run(run_dir: Path) -> Path | None:
    """Test accuracy (regression: RMSE and MAE in the label's units, with the constant
    baseline's) and the largest client ε over rounds, side by side."""
    run_dir = Path(run_dir)
    try:
        rows = results.read_csv(run_dir / results.ROUNDS)
    except FileNotFoundError:
        return None
    if not rows:
        return None
    rounds = [int(r["round"]) for r in rows]
    epsilon = [_number(r.get("max_epsilon")) for r in rows]
    user = [_number(r.get("user_epsilon")) for r in rows]
    plt, MaxNLocator = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if "test_rmse" in rows[0]:
        _regression_panel(left, rounds, rows, _label(run_dir))
    else:
        _accuracy_panel(left, rounds, rows)
    if all(math.isnan(e) for e in epsilon + user):
        right.text(0.5, 0.5, "no differential privacy", ha="center", va="center")
        right.set_axis_off()
    else:
        sample_target, user_target = _targets(run_dir)
        if not all(math.isnan(e) for e in epsilon):
            right.plot(rounds, epsilon, marker="o", color="tab:red",
                       label="sample level (largest client ε)")
            if sample_target is not None:
                right.axhline(sample_target, color="tab:red", linestyle="--", alpha=0.5,
                              label=f"sample-level target {sample_target:g}")
        if not all(math.isnan(e) for e in user):
            right.plot(rounds, user, marker="s", color="tab:purple", label="user level")
            if user_target is not None:
                right.axhline(user_target, color="tab:purple", linestyle="--", alpha=0.5,
                              label=f"user-level target {user_target:g}")
        right.legend(loc="lower right", fontsize="small")
        right.set(xlabel="round", ylabel="ε", title="Privacy spent so far (cumulative)")
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


def _accuracy_panel(left, rounds: list[int], rows: list[dict]) -> None:
    accuracy = [float(r["test_accuracy"]) for r in rows]
    left.plot(rounds, accuracy, marker="o", label="accuracy")
    balanced = [_number(r.get("test_balanced_accuracy")) for r in rows]
    if not all(math.isnan(b) for b in balanced):
        left.plot(rounds, balanced, marker=".", color="tab:green", label="balanced accuracy")
    majority = _number(rows[-1].get("majority_baseline"))
    if not math.isnan(majority):
        left.axhline(majority, color="gray", linestyle="--",
                     label=f"majority class {majority:.3f}")
    if len(left.get_lines()) > 1:
        left.legend(loc="best", fontsize="small")
    left.set(xlabel="round", ylabel="test accuracy", title="Global model on the test set")
    left.grid(alpha=0.3)


def _regression_panel(left, rounds: list[int], rows: list[dict], label: str) -> None:
    """RMSE and MAE over rounds in the label's units, with those of the baseline (the test
    rows' mean predicted for every row) and the last round's R² in the legend."""
    left.plot(rounds, [_number(r.get("test_rmse")) for r in rows], marker="o", label="RMSE")
    left.plot(rounds, [_number(r.get("test_mae")) for r in rows], marker=".",
              color="tab:green", label="MAE")
    for key, name, style in (("baseline_rmse", "RMSE", "--"), ("baseline_mae", "MAE", ":")):
        value = _number(rows[-1].get(key))
        if not math.isnan(value):
            left.axhline(value, color="gray", linestyle=style,
                         label=f"baseline {name} {value:.4g} (test mean)")
    r2 = _number(rows[-1].get("test_r2"))
    left.legend(loc="best", fontsize="small",
                title=None if math.isnan(r2) else f"R² {r2:.3f} (last round)")
    left.set(xlabel="round", ylabel=f"test error ({label or 'label units'})",
             title="Global model on the test set")
    left.grid(alpha=0.3)


def _label(run_dir: Path) -> str:
    try:
        return str((results.read_summary(run_dir).get("target") or {}).get("label") or "")
    except (OSError, ValueError):
        return ""


def _number(text: str | None) -> float:
    return float(text) if text not in (None, "", "inf") else math.nan


def _targets(run_dir: Path) -> tuple[float | None, float | None]:
    try:
        privacy = results.read_summary(run_dir)["privacy"]
    except (OSError, ValueError, KeyError):
        return None, None
    user = privacy.get("user_level") or {}
    return privacy.get("target_epsilon"), user.get("target_epsilon")
