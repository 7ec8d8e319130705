"""`privet drift-compare`: one scenario, several retraining policies, side by side.

Each (policy, seed) is its own `privet simulate` subprocess in OUT/runs/<policy>-seed<s>
(a finished run with the same config is reused, so re-running the command resumes). Then,
from each run's drift.csv and summary.json:

- detection delay and false alarms against the scheduled drift (summary.json → drift);
- the pre-drift gap: mean accuracy minus the majority-class share over the 5 rounds before
  the drift (the model's worth above always answering the majority);
- after the first detection at or after the drift (the drift round itself where nothing was
  detected), the share of that gap the policy holds 5 rounds later (`gap_kept_at_5`), and
  the rounds it takes to regain 90% of it (`rounds_to_90`, empty if it never does);
- the largest ε of any window, the wall time.

Writes drift_compare.csv (one row per run), drift_curves.csv (round, policy, seed,
accuracy, majority), drift_compare.md (mean over seeds per policy) and drift_compare.png
(one panel per policy: every seed's accuracy, the majority baseline, the drift).
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

from privet.common import results
from privet.common import run_dir as run_dirs
from privet.common.config import load_config
from privet.experiments.compare import reusable
from privet.experiments.lifetime import die_with_parent

BEFORE = 5  # rounds before the drift that define the pre-drift gap
AFTER = 5   # rounds after the detection at which the gap kept is read
COLUMNS = ["policy", "seed", "status", "detection_delay", "false_alarms", "accuracy_before",
           "majority_before", "gap_before", "accuracy_after_5", "majority_after_5",
           "gap_kept_at_5", "rounds_to_90", "max_window_epsilon", "wall_seconds"]


def run_name(policy: str, seed: int) -> str:
    return f"{policy}-seed{seed}"


def overrides(policy: str, seed: int) -> list[str]:
    return [f"drift.policy={policy}", f"seed={seed}"]


def simulate(config: Path, sets: list[str], out: Path, policy: str, seed: int) -> Path:
    """Run (or reuse) one policy and seed; returns its run directory."""
    run_dir = out / "runs" / run_name(policy, seed)
    all_sets = [*sets, *overrides(policy, seed)]
    expected = load_config(config, all_sets)
    if not reusable(run_dir, expected):  # (where results go is not compared)
        run_dir = run_dirs.mark(run_dir)  # privet's own: its simulate may claim it
        args = [sys.executable, "-m", "privet.experiments.cli", "simulate", "--config",
                str(config), *[a for s in all_sets for a in ("--set", s)], "--out",
                str(run_dir), "--overwrite"]
        with open(run_dir / "simulate.log", "w", encoding="utf-8") as log:
            subprocess.run(args, stdout=log, stderr=subprocess.STDOUT, check=False,
                           preexec_fn=die_with_parent)
    return run_dir


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return math.nan


def measure(run_dir: Path, policy: str, seed: int) -> tuple[dict, list[dict]]:
    """(the row of drift_compare.csv, the run's curve rows) from a finished run."""
    summary = results.read_summary(run_dir)
    drift = summary.get("drift") or {}
    table = results.read_csv(run_dir / "drift.csv") if (run_dir / "drift.csv").exists() else []
    accuracy = {int(r["round"]): _number(r["accuracy"]) for r in table}
    majority = {int(r["round"]): _number(r["majority"]) for r in table}
    row = {"policy": policy, "seed": seed, "status": summary.get("status"),
           "detection_delay": drift.get("detection_delay"),
           "false_alarms": drift.get("false_alarms"),
           "max_window_epsilon": summary.get("privacy", {}).get("max_window_epsilon"),
           "wall_seconds": round(float(summary.get("wall_seconds", math.nan)), 1)}
    true_rounds = drift.get("true_drift_rounds") or []
    if true_rounds and accuracy:
        start = true_rounds[0]
        before = [r for r in range(start - BEFORE, start) if r in accuracy]
        acc_b = statistics.fmean(accuracy[r] for r in before)
        maj_b = statistics.fmean(majority[r] for r in before)
        gap = acc_b - maj_b
        delay = drift.get("detection_delay")
        detected = start + (delay if delay is not None else 0)
        at = detected + AFTER
        # a model no better than the majority before the drift has no gap to keep
        kept = ({r: (accuracy[r] - majority[r]) / gap for r in accuracy if r >= detected}
                if gap > 0 else {})
        to_90 = next((r - detected for r in sorted(kept) if kept[r] >= 0.9), None)
        row.update({"accuracy_before": round(acc_b, 4), "majority_before": round(maj_b, 4),
                    "gap_before": round(gap, 4),
                    "accuracy_after_5": accuracy.get(at), "majority_after_5": majority.get(at),
                    "gap_kept_at_5": round(kept[at], 3) if at in kept else None,
                    "rounds_to_90": to_90})
    curves = [{"round": r, "policy": policy, "seed": seed, "accuracy": accuracy[r],
               "majority": majority[r]} for r in sorted(accuracy)]
    return row, curves


def _mean(values) -> str:
    found = [float(v) for v in values if v not in (None, "") and not math.isnan(float(v))]
    if not found:
        return "–"
    if len(found) == 1:
        return f"{found[0]:.3g}"
    return f"{statistics.fmean(found):.3g} ± {statistics.stdev(found):.2g}"


def write(out: Path, rows: list[dict], curves: list[dict], true_rounds: list[int],
          run_dirs: list[Path] = ()) -> None:
    """Every file of the comparison, report.html included, into `out`."""
    results.write_csv(out / "drift_compare.csv", COLUMNS, rows)
    results.write_csv(out / "drift_curves.csv", ["round", "policy", "seed", "accuracy",
                                                 "majority"], curves)
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    lines = ["| policy | runs | detection delay | false alarms | accuracy before | gap before "
             "| gap kept 5 rounds after detection | rounds to 90% | max ε per window |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in policies:
        mine = [r for r in rows if r["policy"] == p]
        lines.append(f"| {p} | {len(mine)} | " + " | ".join(_mean(r.get(k) for r in mine) for k in (
            "detection_delay", "false_alarms", "accuracy_before", "gap_before",
            "gap_kept_at_5", "rounds_to_90", "max_window_epsilon")) + " |")
    notes = ["", "– : not measurable: no drift detected (or none scheduled), or the model was "
             "no better than the majority class before the drift (no gap to keep)."]
    results.atomic_write_text(out / "drift_compare.md", "\n".join(lines + notes) + "\n")
    _plot(out / "drift_compare.png", policies, curves, true_rounds)
    results.atomic_write_text(out / "report.html", html_report(out, rows, lines, run_dirs))


def html_report(out: Path, rows: list[dict], table: list[str], run_dirs) -> str:
    """A self-contained page: the policies' table and curves, every run's row, and one
    run's drift.png per policy (accuracy with the true drift, detections and retrains)."""
    import html

    from privet.experiments.report import STYLE, _html_table, _image

    def cells(line: str) -> list[str]:
        return [c.strip() for c in line.strip().strip("|").split("|")]

    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>privet: drift "
             f"policies</title><style>{STYLE}</style></head><body>",
             "<h1>privet: retraining policies under drift</h1>",
             "<p>Accuracy is on held-out rows of the newest window; the gap is accuracy minus "
             "the majority-class share; ε is per window (event level: one row of one window)."
             "</p>", "<h2>Policies (mean ± std over seeds)</h2>",
             _html_table(cells(table[0]), [cells(line) for line in table[2:]]),
             _image(out / "drift_compare.png", "Accuracy over time, per policy")]
    shown = set()
    for run_dir in run_dirs:
        policy = run_dir.name.rsplit("-seed", 1)[0]
        if policy not in shown and (run_dir / "drift.png").exists():
            shown.add(policy)
            parts.append(_image(run_dir / "drift.png", f"{run_dir.name}: true drift (red), "
                                "detections (orange), retraining (green)"))
    parts += ["<h2>Runs</h2>", _html_table(COLUMNS, [[html.escape(str(r.get(c, "")))
                                                      for c in COLUMNS] for r in rows]),
              "</body></html>"]
    return "\n".join(parts) + "\n"


def is_drift_run(run_dir: Path) -> bool:
    try:
        return results.read_summary(run_dir).get("mode") == "drift"
    except (OSError, ValueError):
        return False


SWEPT = ("drift.policy", "seed", "name", "out-dir")  # what runs compared may differ in


def scenario_differences(run_dirs: list[Path]) -> list[str]:
    """The keys (besides the policy, the seed and where results go) in which these runs'
    configs differ, one line each: runs of different scenarios must not be averaged."""
    configs = {d: load_config(d / results.CONFIG).to_run_config() for d in run_dirs}
    keys = sorted({k for c in configs.values() for k in c} - set(SWEPT))
    lines = []
    for key in keys:
        values = {str(c.get(key)) for c in configs.values()}
        if len(values) > 1:
            lines.append(f"{key}: {', '.join(sorted(values))}")
    return lines


def report_runs(run_dirs: list[Path], out: Path) -> Path:
    """`privet report` on drift runs: the comparison files from finished runs, into `out`.
    Raises ValueError when they are runs of different scenarios (scenario_differences)."""
    differ = scenario_differences(run_dirs)
    if differ:
        raise ValueError("these drift runs are of different scenarios (they differ in "
                         + "; ".join(differ[:4]) + ("; ..." if len(differ) > 4 else "")
                         + "): report each scenario apart")
    rows, curves, true_rounds = [], [], []
    for run_dir in run_dirs:
        cfg = load_config(run_dir / results.CONFIG)
        row, curve = measure(run_dir, cfg.drift.policy, cfg.seed)
        rows.append(row)
        curves.extend(curve)
        true_rounds = (results.read_summary(run_dir).get("drift") or {}).get(
            "true_drift_rounds", true_rounds)
    out.mkdir(parents=True, exist_ok=True)
    write(out, rows, curves, true_rounds, run_dirs)
    return out / "report.html"


def _plot(path: Path, policies: list[str], curves: list[dict], true_rounds: list[int]) -> None:
    from privet.common.plots import _pyplot

    plt, _ = _pyplot()
    fig, axes = plt.subplots(1, len(policies), figsize=(4.5 * len(policies), 3.6),
                             sharey=True, squeeze=False)
    for ax, policy in zip(axes[0], policies):
        mine = [c for c in curves if c["policy"] == policy]
        for i, seed in enumerate(sorted({c["seed"] for c in mine})):
            points = [c for c in mine if c["seed"] == seed]
            ax.plot([c["round"] for c in points], [c["accuracy"] for c in points], lw=1,
                    alpha=0.8, label="accuracy (each seed)" if i == 0 else None)
            if i == 0:
                ax.plot([c["round"] for c in points], [c["majority"] for c in points], ":",
                        color="grey", label="majority class")
        for j, r in enumerate(true_rounds):
            ax.axvline(r, color="red", lw=1.5, label="true drift" if j == 0 else None)
        ax.set_title(policy)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy on the newest window")
    axes[0][0].legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
