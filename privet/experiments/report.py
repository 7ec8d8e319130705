"""Compare runs across privacy budgets: one CSV row per run, a summary over seeds, plots and
a self-contained HTML report. Everything is read from run directories, so `privet report`
rebuilds exactly what `privet compare` wrote, without training.

    compare.csv     one row per run: level, target ε, seed, ε achieved per accountant,
                    accuracy (regression: RMSE, MAE, R², baseline RMSE, in the label's
                    units), loss, rounds, wall time, membership-inference audit
    summary.md      mean ± std over seeds per level × target ε (Markdown)
    *.png           accuracy vs ε, accuracy per round, ε spent per round
    report.html     all of the above in one file (plots embedded), opens with no server
"""

from __future__ import annotations

import base64
import html
import math
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from privet.common import results
from privet.common.config import ConfigError, ExperimentConfig, load_config

CSV = "compare.csv"
SUMMARY_MD = "summary.md"
HTML = "report.html"
ACCOUNTANTS = ("pld", "prv", "rdp")
FINISHED = ("complete", "budget-exhausted")  # ended on their own: safe to compare and reuse
LEVEL_ORDER = {"sample": 0, "user": 1, "both": 2, "none": 3}
AUDIT_COLUMNS = ["auc", "tpr_at_fpr_1pct", "tpr_at_fpr_0.1pct", "epsilon_lower_bound",
                 "audit_violation"]
COLUMNS = ["run", "level", "epsilon_target", "seed", "status",
           *(f"epsilon_{a}" for a in ACCOUNTANTS), "accuracy", "loss", "rounds",
           "wall_seconds", *AUDIT_COLUMNS, "run_dir"]
PLOTS = {  # file -> title; the titles are also the HTML section headings
    "accuracy_vs_epsilon.png": "Test accuracy vs target ε",
    "accuracy_per_round.png": "Test accuracy per round",
    "epsilon_per_round.png": "ε spent per round",
}
# train.task = "regression": the scores replace accuracy (no accuracy column: left out, as in
# the run's own files); the plots keep their file names and show the RMSE
REGRESSION_SCORES = ["rmse", "mae", "r2", "baseline_rmse"]
REGRESSION_COLUMNS = [c for name in COLUMNS
                      for c in (REGRESSION_SCORES if name == "accuracy" else [name])]
REGRESSION_PLOTS = {
    "accuracy_vs_epsilon.png": "Test RMSE vs target ε",
    "accuracy_per_round.png": "Test RMSE per round",
    "epsilon_per_round.png": "ε spent per round",
}


@dataclass(frozen=True)
class Metric:
    """What the comparison plots: a compare.csv column, the rounds.csv column behind it."""
    column: str
    per_round: str
    label: str


ACCURACY = Metric("accuracy", "test_accuracy", "test accuracy")
RMSE = Metric("rmse", "test_rmse", "test RMSE (label units)")


def is_regression(rows: list[dict]) -> bool:
    """Whether these runs are regression runs. Raises ValueError when they mix tasks."""
    tasks = {r.get("task", "classification") for r in rows}
    if len(tasks) > 1:
        raise ValueError("these runs mix train.task = \"classification\" and \"regression\": "
                         "compare one task at a time")
    return tasks == {"regression"}


# --- one row per run ----------------------------------------------------------------------

def identity(cfg: ExperimentConfig) -> tuple[str, float]:
    """(level, target ε) of a run, as the compare grid names it; no DP is ("none", inf)."""
    p = cfg.privacy
    if p.level == "user":
        return "user", p.user_epsilon
    if cfg.private:
        return p.level, p.epsilon
    return "none", math.inf


def find_run_dirs(paths: list[Path]) -> list[Path]:
    """Run directories (holding config.toml) among `paths`, a compare DIR's runs/, or the
    direct subfolders of a folder of runs."""
    found: list[Path] = []
    for path in map(Path, paths):
        if (path / results.CONFIG).is_file():
            found.append(path)
            continue
        parent = path / "runs" if (path / "runs").is_dir() else path
        if parent.is_dir():
            found += sorted(d for d in parent.iterdir() if (d / results.CONFIG).is_file())
    unique = dict.fromkeys(p.resolve() for p in found)
    return list(unique)


def run_row(run_dir: Path) -> dict[str, str]:
    run_dir = Path(run_dir).resolve()
    cfg = load_config(run_dir / results.CONFIG)
    level, target = identity(cfg)
    row = dict.fromkeys(REGRESSION_COLUMNS if cfg.regression else COLUMNS, "")  # blank
    row.update({"run": run_dir.name, "level": level, "epsilon_target": _fmt(target),
                "seed": str(cfg.seed), "run_dir": str(run_dir), "task": cfg.train.task})
    try:
        summary = results.read_summary(run_dir)
    except (OSError, ValueError):
        summary = None
    row["status"] = summary.get("status", "") if summary else "no-summary"
    if summary and cfg.regression:
        scores = summary.get("scores") or {}
        row.update({name: _fmt(scores.get(key)) for name, key in zip(
            REGRESSION_SCORES, ("test_rmse", "test_mae", "test_r2", "baseline_rmse"))})
    elif summary:
        row.update(accuracy=_fmt(summary.get("accuracy")))
    if summary:
        row.update(loss=_fmt(summary.get("loss")),
                   rounds=str(summary.get("rounds", "")),
                   wall_seconds=_fmt(summary.get("wall_seconds")))
        row.update(achieved_epsilons(summary, level))
    row.update(audit_columns(run_dir))
    return row


def achieved_epsilons(summary: dict, level: str) -> dict[str, str]:
    """ε recomputed from the ledgers with every accountant: the largest client's at sample
    level, the server's at user level; a run without DP has no bound (inf)."""
    privacy = summary["privacy"]
    delta = privacy["delta"]
    if level == "none":
        return {f"epsilon_{a}": "inf" for a in ACCOUNTANTS}
    if level == "user":
        user = privacy.get("user_level") or {}
        histories = [user.get("history") or []]
    else:
        histories = [c.get("history") or [] for c in privacy["clients"].values()
                     if not c.get("left_out")]
    from privet.common.privacy.accountants import epsilon  # dp-accounting, opacus: heavy

    spent = {}
    for name in ACCOUNTANTS:
        try:
            spent[f"epsilon_{name}"] = _fmt(max((epsilon(h, delta, name) for h in histories),
                                                default=0.0))
        except Exception:  # noqa: BLE001 - an accountant that cannot evaluate: leave it blank
            spent[f"epsilon_{name}"] = ""
    return spent


def audit_columns(run_dir: Path) -> dict[str, str]:
    try:
        audit = results.read_audit(run_dir)
    except (OSError, ValueError):
        return {}
    if audit is None:
        return {}
    tpr = audit.get("tpr_at_fpr") or {}
    violation = audit.get("violation")
    return {"auc": _fmt(audit.get("auc")), "tpr_at_fpr_1pct": _fmt(tpr.get("0.01")),
            "tpr_at_fpr_0.1pct": _fmt(tpr.get("0.001")),
            "epsilon_lower_bound": _fmt(audit.get("epsilon_lower_bound")),
            "audit_violation": "" if violation is None else str(bool(violation)).lower()}


def collect(run_dirs: list[Path]) -> list[dict[str, str]]:
    rows = []
    for run_dir in run_dirs:
        try:
            rows.append(run_row(run_dir))
        except (OSError, ConfigError) as error:
            raise ConfigError(f"{run_dir}: cannot read the run: {error}") from None
    return sorted(rows, key=lambda r: (LEVEL_ORDER.get(r["level"], 9),
                                       float(r["epsilon_target"]), int(r["seed"]), r["run"]))


# --- mean ± std over seeds ----------------------------------------------------------------

@dataclass
class Group:
    level: str
    epsilon: float
    rows: list[dict] = field(default_factory=list)  # every run of this level × ε

    @property
    def finished(self) -> list[dict]:
        return [r for r in self.rows if r["status"] in FINISHED]

    def stat(self, column: str) -> tuple[float, float, int]:
        """Mean, std (over seeds; 0 for one run) and count of a column over finished runs."""
        values = [float(r[column]) for r in self.finished if r.get(column) not in (None, "")]
        if not values:
            return math.nan, math.nan, 0
        if any(math.isinf(v) for v in values):
            return math.inf, 0.0, len(values)
        return (statistics.fmean(values),
                statistics.stdev(values) if len(values) > 1 else 0.0, len(values))


def groups(rows: list[dict]) -> list[Group]:
    by_key: dict[tuple[str, float], Group] = {}
    for row in rows:
        key = (row["level"], float(row["epsilon_target"]))
        by_key.setdefault(key, Group(*key)).rows.append(row)
    return list(by_key.values())  # rows are sorted already, so groups are too


SUMMARY_COLUMNS = [  # (heading, CSV column, digits)
    ("accuracy", "accuracy", 4), ("loss", "loss", 4), ("ε achieved (pld)", "epsilon_pld", 3),
    ("AUC", "auc", 3), ("TPR @ 1% FPR", "tpr_at_fpr_1pct", 3),
    ("ε lower bound", "epsilon_lower_bound", 3), ("wall s", "wall_seconds", 1)]
REGRESSION_SUMMARY_COLUMNS = [  # not audited: common.audit refuses regression runs
    ("RMSE", "rmse", 4), ("MAE", "mae", 4), ("R²", "r2", 4),
    ("baseline RMSE", "baseline_rmse", 4), ("loss", "loss", 4),
    ("ε achieved (pld)", "epsilon_pld", 3), ("wall s", "wall_seconds", 1)]


def summary_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    columns = REGRESSION_SUMMARY_COLUMNS if is_regression(rows) else SUMMARY_COLUMNS
    header = ["level", "ε target", "runs", *(h for h, _, _ in columns), "violations"]
    body = []
    for g in groups(rows):
        cells = [g.level, _fmt(g.epsilon).replace("inf", "∞"),
                 f"{len(g.finished)}/{len(g.rows)}"]
        for _, column, digits in columns:
            mean, std, n = g.stat(column)
            cells.append("–" if n == 0 else "∞" if math.isinf(mean)
                         else f"{mean:.{digits}f} ± {std:.{digits}f}")
        audited = [r for r in g.finished if r.get("audit_violation")]
        cells.append(str(sum(r["audit_violation"] == "true" for r in audited))
                     if audited else "–")
        body.append(cells)
    return header, body


def markdown(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


# --- plots --------------------------------------------------------------------------------

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    _pyplot().close(fig)
    tmp.replace(path)
    return path


def _baseline(gs: list[Group]) -> Group | None:
    return next((g for g in gs if g.level == "none" and g.finished), None)


def plot_accuracy_vs_epsilon(gs: list[Group], path: Path, metric: Metric = ACCURACY,
                             title: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for level in _private_levels(gs):
        points = [(g.epsilon, *g.stat(metric.column)[:2]) for g in gs
                  if g.level == level and g.finished]
        if points:
            x, y, err = zip(*points)
            ax.errorbar(x, y, yerr=err, marker="o", capsize=4, label=f"{level} level")
    base = _baseline(gs)
    if base is not None:
        mean, std, n = base.stat(metric.column)
        ax.axhline(mean, color="black", linestyle="--", label=f"no DP (mean of {n})")
        ax.axhspan(mean - std, mean + std, color="black", alpha=0.12)
    ax.set_xscale("log")
    targets = sorted({g.epsilon for g in gs if g.level != "none"})
    if targets:  # label the budgets that were run, not powers of ten
        ax.set_xticks(targets, [_fmt(t) for t in targets])
        ax.minorticks_off()
    ax.set(xlabel="target ε (log scale)", ylabel=f"final {metric.label}",
           title=(title or PLOTS[path.name]) + " (mean ± std over seeds)")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    return _save(fig, path)


def _rounds(row: dict) -> list[dict]:
    try:
        return results.read_csv(Path(row["run_dir"]) / results.ROUNDS)
    except OSError:
        return []


def _per_round_mean(g: Group, column: str) -> tuple[list[int], list[float]]:
    """Mean over the group's finished runs of a rounds.csv column, round by round."""
    by_round: dict[int, list[float]] = {}
    for row in g.finished:
        for r in _rounds(row):
            if r.get(column) not in (None, "", "inf"):
                by_round.setdefault(int(r["round"]), []).append(float(r[column]))
    rounds = sorted(by_round)
    return rounds, [statistics.fmean(by_round[k]) for k in rounds]


def _private_levels(gs: list[Group]) -> list[str]:
    return list(dict.fromkeys(g.level for g in gs if g.level != "none"))


def _panels(plt, count: int):
    fig, axes = plt.subplots(1, max(1, count), figsize=(6 * max(1, count), 4.5), squeeze=False)
    return fig, list(axes[0])


def plot_accuracy_per_round(gs: list[Group], path: Path, metric: Metric = ACCURACY,
                            title: str = "") -> Path:
    plt = _pyplot()
    title = title or PLOTS[path.name]
    levels = _private_levels(gs) or ["none"]
    fig, axes = _panels(plt, len(levels))
    base = _baseline(gs)
    for ax, level in zip(axes, levels):
        for g in gs:
            if g.level == level and level != "none":
                x, y = _per_round_mean(g, metric.per_round)
                ax.plot(x, y, marker=".", label=f"ε = {_fmt(g.epsilon)}")
        if base is not None:
            x, y = _per_round_mean(base, metric.per_round)
            ax.plot(x, y, color="black", linestyle="--", label="no DP")
        ax.set(xlabel="round", ylabel=f"{metric.label} (mean over seeds)",
               title=f"{title}: {level} level" if level != "none" else title)
        _round_axis(ax)
    return _save(fig, path)


def plot_epsilon_per_round(gs: list[Group], path: Path, metric: Metric = ACCURACY,
                           title: str = "") -> Path:
    plt = _pyplot()
    levels = _private_levels(gs)
    fig, axes = _panels(plt, len(levels))
    if not levels:
        axes[0].text(0.5, 0.5, "no differential privacy in these runs", ha="center")
        axes[0].set_axis_off()
        axes[0].set_title(PLOTS[path.name])
    for ax, level in zip(axes, levels):
        column = "user_epsilon" if level == "user" else "max_epsilon"
        for g in (g for g in gs if g.level == level):
            x, y = _per_round_mean(g, column)
            line, = ax.plot(x, y, marker=".", label=f"target ε = {_fmt(g.epsilon)}")
            ax.axhline(g.epsilon, color=line.get_color(), linestyle=":", alpha=0.6)
        what = "user-level ε" if level == "user" else "largest client ε"
        ax.set(xlabel="round", ylabel=f"{what}, cumulative (mean over seeds)",
               title=f"{PLOTS[path.name]}: {level} level")
        low, high = ax.get_ylim()
        if low > 0 and high / low > 10:  # budgets a decade apart stay readable
            ax.set_yscale("log")
        _round_axis(ax)
    return _save(fig, path)


def _round_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")


def plot_titles(rows: list[dict]) -> dict[str, str]:
    """Each plot's file name and title (the HTML headings) for these runs' task."""
    return REGRESSION_PLOTS if is_regression(rows) else PLOTS


def plots(rows: list[dict], out: Path) -> list[Path]:
    gs = groups(rows)
    metric = RMSE if is_regression(rows) else ACCURACY
    draw = (plot_accuracy_vs_epsilon, plot_accuracy_per_round, plot_epsilon_per_round)
    return [fn(gs, out / name, metric, title)
            for fn, (name, title) in zip(draw, plot_titles(rows).items())]


# --- HTML ---------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.4em; text-align: right; }
th { background: #f2f2f2; white-space: nowrap; }
td:first-child, th:first-child { text-align: left; white-space: nowrap; }
tr.violation td { background: #fdd; } img { max-width: 100%; border: 1px solid #eee; }
.banner { background: #c00; color: #fff; font-size: 1.3em; font-weight: bold; padding: 1em;
          border-radius: 6px; margin: 1em 0; }
.note { background: #f5f5f5; padding: 0.6em 1em; border-left: 4px solid #999; }
.warning { background: #fff4e0; padding: 0.6em 1em; border-left: 4px solid #e08a00;
           margin: 1em 0; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
"""
RUN_TABLE = ["run", "level", "epsilon_target", "seed", "status", "epsilon_pld", "epsilon_prv",
             "epsilon_rdp", "accuracy", "loss", "rounds", "wall_seconds", *AUDIT_COLUMNS]
REGRESSION_RUN_TABLE = [c for name in RUN_TABLE if name not in AUDIT_COLUMNS
                        for c in (REGRESSION_SCORES if name == "accuracy" else [name])]


def _html_table(header: list[str], body: list[list[str]], flagged: set[int] = frozenset()
                ) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    lines = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for i, cells in enumerate(body):
        css = ' class="violation"' if i in flagged else ""
        lines.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                     + "</tr>")
    return "\n".join(lines + ["</tbody></table>"])


def _image(path: Path, title: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (f"<h2>{html.escape(title)}</h2>\n"
            f'<img src="data:image/png;base64,{data}" alt="{html.escape(title)}">')


# What a sweep varies (privet compare's grid: compare.GridRun.overrides), and what names a run
# or says where its results go: runs may differ in these and still be compared
SWEPT_KEYS = ("privacy.level", "privacy.epsilon", "privacy.user-epsilon", "seed")
UNCOMPARED_KEYS = ("name", "out-dir")
UNCOMPARED_SECTIONS = ("tracking.",)


def config_differences(rows: list[dict]) -> list[str]:
    """One line per config key, other than the swept ones (level, ε, seed) and those that
    only name a run or say where it is logged, whose value differs between the runs of this
    report: e.g. `rounds` or `data.dataset`. Such runs are pooled and compared as if only
    their budget differed."""
    configs = [(r["run"], load_config(Path(r["run_dir"]) / results.CONFIG).to_run_config())
               for r in rows]
    keys = list(dict.fromkeys(k for _, flat in configs for k in flat))
    lines = []
    for key in keys:
        if key in SWEPT_KEYS or key in UNCOMPARED_KEYS or key.startswith(UNCOMPARED_SECTIONS):
            continue
        by_value: dict[str, list[str]] = {}
        for run, flat in configs:
            by_value.setdefault(_shown(flat.get(key)), []).append(run)
        if len(by_value) < 2:
            continue
        parts = [f"{value} in {_names(runs)}" for value, runs in by_value.items()]
        lines.append(f"the runs compared differ in {key}, which the sweep does not vary: "
                     + "; ".join(parts))
    return lines


def _shown(value) -> str:
    text = "(unset)" if value is None else (
        ("true" if value else "false") if isinstance(value, bool) else
        "inf" if isinstance(value, float) and math.isinf(value) else
        repr(value) if isinstance(value, str) else str(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _names(runs: list[str], shown: int = 3) -> str:
    more = f" and {len(runs) - shown} more" if len(runs) > shown else ""
    return f"{len(runs)} run(s): {', '.join(runs[:shown])}{more}"


def config_text(rows: list[dict]) -> str:
    """The first run's config.toml, with the keys that differ between runs marked."""
    if not rows:
        return ""
    flat = [load_config(Path(r["run_dir"]) / results.CONFIG).to_run_config() for r in rows]
    varying = {k for k in flat[0] if len({repr(f.get(k)) for f in flat}) > 1} - {"out-dir"}
    section, lines = "", []
    text = (Path(rows[0]["run_dir"]) / results.CONFIG).read_text(encoding="utf-8")
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("[") and stripped.endswith("]"):
            section = stripped[1:-1] + "."
        key = stripped.partition("=")[0].strip()
        if key == "out-dir" and not section:
            continue  # differs by construction
        if "=" in stripped and section + key in varying:
            line += "    # varies between runs: see the table of runs"
        lines.append(line)
    return "\n".join(lines)


def html_report(rows: list[dict], header: list[str], body: list[list[str]],
                images: list[Path], warnings: list[str] | None = None) -> str:
    violations = [r for r in rows if r.get("audit_violation") == "true"]
    regression = is_regression(rows)
    titles = plot_titles(rows)
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>privet: privacy "
             f"comparison</title><style>{STYLE}</style></head><body>",
             "<h1>privet: " + ("regression error" if regression else "accuracy")
             + " and privacy across budgets</h1>"]
    if violations:
        names = ", ".join(r["run"] for r in violations)
        parts.append(f'<div class="banner">AUDIT VIOLATION in {len(violations)} run(s): '
                     f"the membership-inference audit measured more privacy loss than the "
                     f"accounted ε allows ({html.escape(names)}). Do not trust these ε values "
                     f"until this is explained.</div>")
    if warnings:
        parts.append('<div class="warning"><b>These runs differ in more than the swept keys '
                     "(level, ε, seed):</b><ul>" + "".join(
                         f"<li>{html.escape(line)}</li>" for line in warnings)
                     + "</ul></div>")
    if regression:
        parts.append('<p class="note">Regression runs: RMSE, MAE and R² on the server\'s '
                     "test set in the label's own units; the baseline predicts the test rows' "
                     "mean for every row (R² 0). Not audited: the membership-inference "
                     "attacks are written for classifiers (<code>privet audit</code> refuses "
                     "regression runs).</p>")
    elif not any(r.get("auc") for r in rows):
        parts.append('<p class="note">No audit results: privet.common.audit was not available when '
                     "these runs were compared, or the audit failed (run "
                     "<code>privet audit RUN_DIR</code>).</p>")
    parts.append(f"<p>{len(rows)} run(s); mean ± std over seeds of the runs that finished. "
                 "ε achieved is recomputed from each run's privacy ledgers (sample level: the "
                 "largest client's; user level: the server's).</p>")
    parts += ["<h2>Summary</h2>", _html_table(header, body)]
    parts += [_image(path, titles[path.name]) for path in images]
    flagged = {i for i, r in enumerate(rows) if r.get("audit_violation") == "true"}
    table = REGRESSION_RUN_TABLE if regression else RUN_TABLE
    parts += ["<h2>Runs</h2>", '<div style="overflow-x: auto">',
              _html_table(table, [[r.get(c, "") for c in table] for r in rows],
                          flagged), "</div>"]
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(config_text(rows), quote=False)}</pre>",
              "</body></html>"]
    return "\n".join(parts) + "\n"


# --- everything ---------------------------------------------------------------------------

@dataclass
class Report:
    rows: list[dict]
    header: list[str]
    body: list[list[str]]
    files: list[Path]
    warnings: list[str] = field(default_factory=list)  # config_differences: one per key


def build(run_dirs: list[Path], out: Path) -> Report:
    """Write compare.csv, summary.md, the plots and report.html for these runs into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(run_dirs)
    warnings = config_differences(rows)
    results.write_csv(out / CSV, REGRESSION_COLUMNS if is_regression(rows) else COLUMNS, rows)
    header, body = summary_table(rows)
    results.atomic_write_text(out / SUMMARY_MD, markdown(header, body))
    images = plots(rows, out)
    results.atomic_write_text(out / HTML, html_report(rows, header, body, images, warnings))
    return Report(rows, header, body, [out / CSV, out / SUMMARY_MD, *images, out / HTML],
                  warnings)


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if found := shutil.which(name):
            return found
    return None


def render_check(html_path: Path, png_path: Path) -> bool:
    """Screenshot the report in headless Chromium; True when a non-blank PNG came out.

    Proves the file renders on its own (no server, no network): what a reader will see."""
    binary = chromium_binary()
    if binary is None:
        return False
    png_path = Path(png_path).resolve()
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="privet-chromium-") as profile:
        try:  # chromium may exit non-zero over dbus/GPU noise; the PNG is what counts
            subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu",
                            f"--user-data-dir={profile}", f"--screenshot={png_path}",
                            "--window-size=1200,2000",
                            Path(html_path).resolve().as_uri()],
                           capture_output=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
    if not png_path.is_file() or png_path.stat().st_size < 5000:
        return False
    import matplotlib.image

    pixels = matplotlib.image.imread(png_path)
    return float(pixels[..., :3].std()) > 0.02  # a blank page is one flat colour


def _fmt(value) -> str:
    if value is None or value == "":
        return ""
    value = float(value)
    if math.isnan(value):
        return ""
    return "inf" if math.isinf(value) else f"{value:.6g}"
