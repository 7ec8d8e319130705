"""`privet compare` / `privet report`: the grid runs, resumes, and reports what it ran."""

import csv
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PROJECT_DIR

from privet.common import results
from privet.common.config import CONFIGS_DIR, load_config
from privet.experiments import compare, report

TINY = CONFIGS_DIR / "tiny.toml"
RUNS = ("sample-eps1-seed7", "none-epsinf-seed7")  # tiny.toml's seed is 7
PROMISED = ["level", "epsilon_target", "seed", "epsilon_pld", "epsilon_prv", "epsilon_rdp",
            "accuracy", "loss", "rounds", "wall_seconds", "auc", "tpr_at_fpr_1pct",
            "tpr_at_fpr_0.1pct", "epsilon_lower_bound", "audit_violation"]


def privet(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "privet.experiments.cli", *args], cwd=PROJECT_DIR,
                          capture_output=True, text=True, timeout=400)
    return done, time.time() - started


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The same 2-run grid twice (in parallel: --jobs 2); the second call must reuse both."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    args = ("compare", "--config", str(TINY), "--set", "rounds=1", "--epsilons", "1,inf",
            "--seeds", "1", "--levels", "sample", "--jobs", "2", "--out", str(out))
    first, first_s = privet(*args)
    assert first.returncode == 0, first.stdout + first.stderr
    mtimes = {r: (out / "runs" / r / "summary.json").stat().st_mtime_ns for r in RUNS}
    second, second_s = privet(*args)
    return out, first, first_s, second, second_s, mtimes


# --- fast: the grid and what counts as finished -------------------------------------------

def test_grid_has_the_baseline_once_per_seed_and_the_right_overrides():
    runs = compare.grid(7, ["sample", "user"], [1.0, math.inf, 0.5], 2)
    assert [r.name for r in runs] == [
        "none-epsinf-seed7", "sample-eps1-seed7", "sample-eps0.5-seed7", "user-eps1-seed7",
        "user-eps0.5-seed7", "none-epsinf-seed8", "sample-eps1-seed8", "sample-eps0.5-seed8",
        "user-eps1-seed8", "user-eps0.5-seed8"]
    configs = compare.resolve(TINY, ["rounds=1", "privacy.level=both"], runs)
    user = configs[runs[3]]
    assert (user.privacy.level, user.privacy.user_epsilon, user.seed) == ("user", 1.0, 7)
    sample = configs[runs[7]]
    assert (sample.privacy.level, sample.privacy.epsilon, sample.seed) == ("sample", 0.5, 8)
    assert configs[runs[5]].privacy.level == "none" and configs[runs[5]].rounds == 1
    assert report.identity(configs[runs[5]]) == ("none", math.inf)
    assert report.identity(user) == ("user", 1.0)


@pytest.mark.parametrize("text", ["", "1,x", "0,1", "-1"])
def test_bad_epsilons_are_refused(text):
    with pytest.raises(ValueError, match="--epsilons"):
        compare.parse_epsilons(text)


def test_bad_levels_are_refused():
    assert compare.parse_levels("user, sample") == ["user", "sample"]
    with pytest.raises(ValueError, match="--levels"):
        compare.parse_levels("sample,both")


# --- end to end: two tiny runs through `privet compare` -----------------------------------

@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_grid_runs_then_resumes_without_redoing(grid):
    out, first, first_s, second, second_s, mtimes = grid
    assert second.returncode == 0, second.stdout + second.stderr
    for name in RUNS:
        summary = json.loads((out / "runs" / name / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["rounds"] == 1
        assert (out / "runs" / name / "summary.json").stat().st_mtime_ns == mtimes[name]
    assert "2 already done" in second.stdout and second.stdout.count("reused") == 2
    # nothing ran again: no run's log was rewritten (not a timing: the machine may be busy)
    assert "done in" not in second.stdout


def test_finished_runs_with_another_config_or_interrupted_are_redone(grid, tmp_path):
    out = grid[0]
    run = compare.GridRun("sample", 1.0, 7)
    expected = compare.resolve(TINY, ["rounds=1"], [run])[run]
    copy = tmp_path / run.name
    shutil.copytree(out / "runs" / run.name, copy)
    assert compare.reusable(copy, expected)
    assert not compare.reusable(copy, load_config(TINY, ["rounds=2", *run.overrides()]))
    summary = json.loads((copy / "summary.json").read_text())
    summary["status"] = "interrupted"
    (copy / "summary.json").write_text(json.dumps(summary))
    assert not compare.reusable(copy, expected)


def test_csv_has_a_row_per_run_with_every_column(grid):
    out = grid[0]
    rows = read_rows(out / report.CSV)
    assert set(PROMISED) <= set(rows[0])
    by_level = {r["level"]: r for r in rows}
    assert len(rows) == 2 and set(by_level) == {"sample", "none"}
    private, baseline = by_level["sample"], by_level["none"]
    assert (private["epsilon_target"], private["seed"], private["rounds"]) == ("1", "7", "1")
    # recomputed from the ledgers: PLD calibrated the noise, so it meets the target; RDP is
    # looser; the baseline has no bound at all
    assert 0.9 < float(private["epsilon_pld"]) <= 1.0 + 1e-6
    assert float(private["epsilon_rdp"]) >= float(private["epsilon_pld"])
    assert baseline["epsilon_pld"] == "inf" and baseline["epsilon_target"] == "inf"
    for row in rows:
        assert 0.5 < float(row["accuracy"]) <= 1 and float(row["wall_seconds"]) > 0
        # the audit ran after each run
        assert 0 <= float(row["auc"]) <= 1 and row["audit_violation"] in ("true", "false")
        assert float(row["epsilon_lower_bound"]) >= 0 and row["tpr_at_fpr_1pct"]
    summary_md = (out / report.SUMMARY_MD).read_text()
    assert summary_md.startswith("| level | ε target | runs | accuracy")
    assert "| sample | 1 | 1/1 |" in summary_md and "| none | ∞ | 1/1 |" in summary_md


def test_html_embeds_every_plot_and_the_tables(grid):
    out = grid[0]
    page = (out / report.HTML).read_text()
    assert page.count('<img src="data:image/png;base64,') == len(report.PLOTS)
    for name, title in report.PLOTS.items():
        assert (out / name).is_file() and f"<h2>{title}</h2>" in page
    assert "<h2>Summary</h2>" in page and "<h2>Runs</h2>" in page
    assert all(name in page for name in RUNS)
    assert 'name = "tiny"' in page and "varies between runs" in page  # the config used
    assert "src=\"http" not in page and "<script" not in page  # nothing to fetch
    violated = any(r["audit_violation"] == "true" for r in read_rows(out / report.CSV))
    assert ('class="banner"' in page) == violated


def test_report_rebuilds_the_same_csv_from_run_dirs(grid, tmp_path):
    out = grid[0]
    done, _ = privet("report", *(str(out / "runs" / r) for r in RUNS), "--out", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / report.CSV).read_text() == (out / report.CSV).read_text()
    assert (tmp_path / report.SUMMARY_MD).read_text() == (out / report.SUMMARY_MD).read_text()
    assert (tmp_path / report.HTML).is_file()


def test_a_violation_gets_a_red_banner_and_a_missing_audit_blank_columns(grid, tmp_path):
    out = grid[0]
    runs = [tmp_path / "runs" / r for r in RUNS]
    for name, copy in zip(RUNS, runs):
        shutil.copytree(out / "runs" / name, copy)
    (runs[1] / results.AUDIT).unlink(missing_ok=True)
    (runs[0] / results.AUDIT).write_text(json.dumps({
        "auc": 0.9, "tpr_at_fpr": {"0.01": 0.5, "0.001": 0.2}, "epsilon_lower_bound": 3.0,
        "theoretical_epsilon": 1.0, "violation": True, "message": "VIOLATION"}))
    built = report.build(report.find_run_dirs([tmp_path]), tmp_path / "out")
    rows = {r["level"]: r for r in built.rows}
    assert rows["sample"]["audit_violation"] == "true"
    assert rows["sample"]["epsilon_lower_bound"] == "3"
    assert all(rows["none"][c] == "" for c in report.AUDIT_COLUMNS)
    page = (tmp_path / "out" / report.HTML).read_text()
    assert 'class="banner">AUDIT VIOLATION in 1 run(s)' in page
    assert '<tr class="violation"><td>sample-eps1-seed7</td>' in page


def test_the_report_renders_in_chromium(grid, tmp_path):
    if report.chromium_binary() is None:
        pytest.skip("no chromium / chromium-browser / google-chrome binary on PATH "
                    "(apt-get install chromium)")
    png = tmp_path / "report.png"
    assert report.render_check(grid[0] / report.HTML, png), "chromium wrote no usable PNG"
    assert png.stat().st_size > 5000
