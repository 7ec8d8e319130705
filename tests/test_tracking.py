"""`[tracking]`: MLflow and TensorBoard, read back through their own clients; the report's
warning about runs that differ in more than the swept keys."""

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import PROJECT_DIR

from privet.common import results
from privet.common.config import CONFIGS_DIR, load_config
from privet.experiments import report
from privet.server import tracking

TINY = CONFIGS_DIR / "tiny.toml"
RUNS = ("sample-eps1-seed7", "none-epsinf-seed7")  # tiny.toml's seed is 7
FILES = {"config.toml", "rounds.csv", "metrics.csv", "summary.json", "model.pt", "model.json",
         "partitions.csv", "accuracy_epsilon.png", "transform.json", "epsilon_per_client.csv"}
# MLflow 3.18 opens a ./mlruns file store only when asked to (privet asks in its own process)
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def privet(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privet.experiments.cli", *args],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=400,
                          env=env)


def mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=str(store))


def only_run(client, experiment: str):
    found = client.get_experiment_by_name(experiment)
    assert found is not None, [e.name for e in client.search_experiments()]
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def rounds_of(run_dir: Path) -> list[dict]:
    return results.read_csv(run_dir / results.ROUNDS)


def assert_history_is_rounds_csv(client, run_id: str, run_dir: Path) -> None:
    """Every rounds.csv column (but `round`) is a metric whose history is the column, step
    = round."""
    rows = rounds_of(run_dir)
    assert rows
    for column in rows[0]:
        if column == "round" or not any(r[column] for r in rows):
            continue
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, column))
        assert history == [(int(r["round"]), float(r[column])) for r in rows if r[column]], \
            column


def shim(tmp_path: Path, code: str) -> dict:
    """An environment whose Python runs `code` first (sitecustomize.py on PYTHONPATH)."""
    folder = tmp_path / "shim"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(code))
    path = os.pathsep.join(p for p in (str(folder), str(PROJECT_DIR),
                                       os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


# --- one tracked run: MLflow and TensorBoard ----------------------------------------------

@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """privet simulate (tiny) into an MLflow file store and a TensorBoard folder."""
    base = tmp_path_factory.mktemp("tracked")
    run_dir, store, board = base / "run", base / "mlruns", base / "tb"
    done = privet("simulate", "--config", str(TINY), "--set", f'tracking.mlflow="{store}"',
                  "--set", f'tracking.tensorboard="{board}"', "--out", str(run_dir))
    assert done.returncode == 0, done.stdout + done.stderr
    return run_dir, store, board, done


def test_mlflow_holds_the_config_every_round_and_the_files(tracked):
    run_dir, store, _, done = tracked
    client = mlflow_client(store)
    run = only_run(client, "tiny")  # the experiment: the config's name
    summary = results.read_summary(run_dir)
    assert run.info.run_name == run_dir.name and run.info.status == "FINISHED"
    # params: the flattened config, as "section.key"
    cfg = load_config(run_dir / results.CONFIG)
    # (drift.* only for a drift-mode run, which this is not)
    expected = {k: v for k, v in cfg.to_run_config().items()
                if not k.startswith(("tracking.", "drift."))}
    assert set(run.data.params) == set(expected)
    assert run.data.params["train.lr"] == "0.2" and run.data.params["rounds"] == "2"
    assert run.data.params["privacy.level"] == "sample"
    assert run.data.params["data.download"] == "false"
    tags = run.data.tags
    assert (tags["level"], tags["epsilon_target"], tags["seed"]) == ("sample", "2", "7")
    assert tags["privet.run_id"] == summary["run_id"] and tags["privet.status"] == "complete"
    assert_history_is_rounds_csv(client, run.info.run_id, run_dir)
    # per-client ε: a summary as metrics, every client in a CSV artifact
    clients = summary["privacy"]["clients"]
    spent = [c["epsilon"] for c in clients.values()]
    assert run.data.metrics["client_epsilon/max"] == pytest.approx(max(spent))
    assert run.data.metrics["client_epsilon/count"] == len(spent) == 3
    assert not any(k.startswith("epsilon/client") for k in run.data.metrics)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == FILES
    table = Path(client.download_artifacts(run.info.run_id, tracking.PER_CLIENT_CSV,
                                           str(run_dir.parent / "download")))
    with open(table, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["client"]: float(r["epsilon"]) for r in rows} == {
        cid: c["epsilon"] for cid, c in clients.items()}
    # the summary says where, and that all of it went; so does the console
    assert summary["tracking"]["mlflow"] == {
        "uri": str(store), "experiment": "tiny", "run_id": run.info.run_id, "ok": True,
        "error": None}
    assert f"tracked in mlflow: experiment 'tiny', run {run.info.run_id}" in done.stdout
    assert "warning" not in done.stderr


def test_tensorboard_scalars_are_rounds_csv(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    run_dir, _, board, _ = tracked
    folder = board / "tiny" / run_dir.name
    assert results.read_summary(run_dir)["tracking"]["tensorboard"] == {
        "dir": str(folder), "experiment": "tiny", "ok": True, "error": None}
    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    rows = rounds_of(run_dir)
    columns = [c for c in rows[0] if c != "round" and any(r[c] for r in rows)]
    assert set(columns) <= tags and "client_epsilon/max" in tags
    for column in columns:
        got = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
               for e in events.Tensors(column)]
        want = [(int(r["round"]), float(r[column])) for r in rows if r[column]]
        assert [s for s, _ in got] == [s for s, _ in want], column
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), column


# --- privet compare: one experiment, a run per grid point, never twice ---------------------

@pytest.fixture(scope="module")
def tracked_grid(tmp_path_factory):
    """A 2-run grid tracked live by its runs (two at a time: one experiment made once)."""
    base = tmp_path_factory.mktemp("grid")
    out, store = base / "cmp", base / "mlruns"
    args = ["compare", "--config", str(TINY), "--set", "rounds=1", "--epsilons", "1,inf",
            "--seeds", "1", "--no-audit", "--jobs", "2", "--out", str(out)]
    first = privet(*args, "--set", f'tracking.mlflow="{store}"')
    assert first.returncode == 0, first.stdout + first.stderr
    mtimes = {r: (out / "runs" / r / "summary.json").stat().st_mtime_ns for r in RUNS}
    return base, out, store, args, first, mtimes


def grid_runs(client, experiment: str) -> dict:
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    return {r.info.run_name: r for r in client.search_runs([found.experiment_id])}


@pytest.mark.slow
def test_compare_logs_each_grid_point_once_in_one_experiment(tracked_grid):
    base, out, store, args, first, mtimes = tracked_grid
    client = mlflow_client(store)
    assert [e.name for e in client.search_experiments() if e.name != "Default"] == ["cmp"]
    runs = grid_runs(client, "cmp")  # the comparison folder's name
    assert set(runs) == set(RUNS)
    for name, run in runs.items():
        tags, params = run.data.tags, run.data.params
        level, eps = ("sample", "1") if name.startswith("sample") else ("none", "inf")
        assert (tags["level"], tags["epsilon_target"], tags["seed"]) == (level, eps, "7")
        assert params["privacy.level"] == level and params["seed"] == "7"
        assert run.info.status == "FINISHED"
        assert_history_is_rounds_csv(client, run.info.run_id, out / "runs" / name)
    assert "warning" not in first.stderr  # the grid differs in level, ε and seed only
    # resumed: both runs reused (not trained again), and not logged again
    again = privet(*args, "--set", f'tracking.mlflow="{store}"')
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 already done" in again.stdout
    assert mtimes == {r: (out / "runs" / r / "summary.json").stat().st_mtime_ns for r in RUNS}
    assert {n: r.info.run_id for n, r in grid_runs(client, "cmp").items()} == {
        n: r.info.run_id for n, r in runs.items()}


@pytest.mark.slow
def test_compare_logs_reused_runs_where_tracking_was_added(tracked_grid):
    """Tracking pointed somewhere new on a resumed sweep: the reused runs are logged there
    from their files, with the audit a run has, and a third call adds nothing."""
    base, out, _, args, _, mtimes = tracked_grid
    store, board = base / "later-mlruns", base / "tb"
    sample = out / "runs" / RUNS[0]
    audit = {"auc": 0.52, "tpr_at_fpr": {"0.01": 0.02, "0.001": 0.0},
             "epsilon_lower_bound": 0.1, "violation": False}  # as privet audit writes it
    (sample / results.AUDIT).write_text(json.dumps(audit))
    sets = ["--set", f'tracking.mlflow="{store}"', "--set", f'tracking.tensorboard="{board}"']
    for _ in range(2):
        done = privet(*args, *sets)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "2 already done" in done.stdout and "tracking" not in done.stdout
    assert mtimes == {r: (out / "runs" / r / "summary.json").stat().st_mtime_ns for r in RUNS}
    client = mlflow_client(store)
    runs = grid_runs(client, "cmp")
    assert set(runs) == set(RUNS)
    for name, run in runs.items():
        assert_history_is_rounds_csv(client, run.info.run_id, out / "runs" / name)
        assert run.data.tags["privet.run_id"] == results.read_summary(
            out / "runs" / name)["run_id"]
    logged = runs[RUNS[0]]
    assert logged.data.metrics["audit/auc"] == pytest.approx(0.52)
    assert logged.data.tags["audit_violation"] == "false"
    assert results.AUDIT in {a.path for a in client.list_artifacts(logged.info.run_id)}
    assert {p.parent.name for p in (board / "cmp").glob("*/events.*")} == set(RUNS)


# --- failures ----------------------------------------------------------------------------

HIDE = """
import sys
sys.modules[{module!r}] = None  # `import {module}` now fails as if it were not installed
"""


@pytest.mark.parametrize("command, key, module", [
    ("simulate", "mlflow", "mlflow"), ("simulate", "tensorboard", "tensorboard"),
    ("compare", "mlflow", "mlflow")])
def test_a_missing_library_is_one_line_before_anything_trains(tmp_path, command, key,
                                                               module):
    out = tmp_path / "out"
    extra = ["--epsilons", "1", "--seeds", "1"] if command == "compare" else []
    done = privet(command, "--config", str(TINY), *extra, "--set",
                  f'tracking.{key}="{tmp_path / "store"}"', "--out", str(out),
                  env=shim(tmp_path, HIDE.format(module=module)))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"tracking.{key}" in lines[0] and f"pip install 'privet[{key}]'" in lines[0]
    assert "round" not in done.stdout
    assert not (out / "runs").exists() and not (out / results.SUMMARY).exists()


FAIL_MID_RUN = """
import importlib.abc, importlib.util, sys

class Hook(importlib.abc.MetaPathFinder):
    \"\"\"MlflowClient.log_batch fails from its third call on: the params and round 1 are
    logged, then the tracking server goes away.\"\"\"

    def find_spec(self, name, path, target=None):
        if name != "mlflow.tracking.client":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            real, calls = module.MlflowClient.log_batch, []

            def log_batch(self, *args, **kwargs):
                calls.append(1)
                if len(calls) >= 3:
                    raise ConnectionError("connection refused (the test's server went away)")
                return real(self, *args, **kwargs)

            module.MlflowClient.log_batch = log_batch

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, Hook())
"""


def test_a_tracking_failure_mid_run_is_one_warning_and_the_run_completes(tmp_path):
    run_dir, store, board = tmp_path / "run", tmp_path / "mlruns", tmp_path / "tb"
    done = privet("simulate", "--config", str(TINY), "--set", f'tracking.mlflow="{store}"',
                  "--set", f'tracking.tensorboard="{board}"', "--out", str(run_dir),
                  env=shim(tmp_path, FAIL_MID_RUN))
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, done.stderr
    assert "tracking.mlflow" in warnings[0] and "round 2" in warnings[0]
    assert "connection refused" in warnings[0]
    summary = results.read_summary(run_dir)
    assert summary["status"] == "complete" and summary["rounds"] == 2
    assert len(rounds_of(run_dir)) == 2
    state = summary["tracking"]["mlflow"]
    assert state["ok"] is False and state["error"].startswith("round 2: ConnectionError")
    assert summary["tracking"]["tensorboard"]["ok"] is True  # the other backend went on
    assert "tracking in mlflow stopped" in done.stdout
    client = mlflow_client(store)  # what went before the failure is there
    run = only_run(client, "tiny")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test_accuracy")] == [1]


def test_failures_are_warned_once_and_the_rest_is_skipped():
    class Flaky:
        key = "mlflow"
        rounds: list[int] = []

        def describe(self):
            return {"uri": "http://127.0.0.1:1"}

        def on_run_start(self, run):
            pass

        def on_round_end(self, server_round, values, wall_time):
            if server_round >= 2:
                raise OSError("no route to host")
            self.rounds.append(server_round)

        def on_run_end(self, *args):
            raise AssertionError("a failed backend is not called again")

    warned: list[str] = []
    run = tracking.Tracking([Flaky()], warn=warned.append)
    run.start(tracking.RunInfo(load_config(TINY), Path("/nonexistent/run"), "id", 0.0))
    for n in (1, 2, 3):
        run.round_end(n, {"round": str(n), "test_accuracy": "0.5", "elapsed_seconds": "1"})
    assert run.end("complete") and not run.end("complete")
    assert Flaky.rounds == [1] and len(warned) == 1
    assert "tracking.mlflow (http://127.0.0.1:1) failed at round 2" in warned[0]
    assert run.summary() == {"mlflow": {"uri": "http://127.0.0.1:1", "ok": False,
                                        "error": "round 2: OSError: no route to host"}}


@pytest.mark.parametrize("store", ["mlruns", "sqlite"])
def test_an_interrupted_run_is_killed_in_mlflow(tmp_path, monkeypatch, store):
    """Ctrl-C: privet simulate ends the run's tracking itself; in a file store and in SQLite
    (MLflow's recommended local store: SQLAlchemy and Alembic come with Flower)."""
    monkeypatch.chdir(tmp_path)  # SQLite: MLflow keeps the artifacts in ./mlruns
    uri = (f"sqlite:///{tmp_path / 'mlflow.db'}" if store == "sqlite"
           else str(tmp_path / "mlruns"))
    cfg = load_config(TINY, [f'tracking.mlflow="{uri}"'])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    results.atomic_write_text(run_dir / results.CONFIG, cfg.to_toml())
    run = tracking.Tracking.for_run(cfg, run_dir, "abc")
    run.round_end(1, {"round": "1", "test_accuracy": "0.5", "elapsed_seconds": "1.5"})
    tracking.end_open(run_dir, "interrupted")  # what privet simulate does on Ctrl-C
    logged = only_run(mlflow_client(uri), "tiny")
    assert logged.info.status == "KILLED" and logged.data.tags["privet.status"] == "interrupted"
    assert logged.data.metrics["test_accuracy"] == 0.5
    assert run.summary()["mlflow"]["ok"] is True


def test_long_param_values_are_cut_to_mlflow_s_limit():
    vocabulary = json.dumps({"colour": [f"value-{i}" for i in range(2000)]})
    cfg = load_config(TINY, [f"data.categories={vocabulary}"])
    params = tracking.params_of(cfg)
    assert len(cfg.data.categories) > tracking.PARAM_VALUE_LIMIT
    assert len(params["data.categories"]) == tracking.PARAM_VALUE_LIMIT
    assert params["data.categories"].endswith("characters; see config.toml)")
    assert params["privacy.epsilon"] == "2.0" and "tracking.mlflow" not in params


def test_nothing_is_imported_without_tracking():
    code = ("import sys; import privet.server.recorder, privet.experiments.compare; "
            "from privet.common.config import load_config; from privet.server import tracking;"
            f" tracking.check(load_config({str(TINY)!r})); "
            "print(sorted(m for m in ('mlflow', 'tensorboard') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# --- privet report: runs that differ in more than level, ε and seed ------------------------

def fake_runs(tmp_path: Path, overrides: dict[str, list[str]]) -> list[dict]:
    rows = []
    for name, sets in overrides.items():
        run_dir = tmp_path / name
        run_dir.mkdir()
        cfg = load_config(TINY, [*sets, f'out-dir="{run_dir}"'])
        results.atomic_write_text(run_dir / results.CONFIG, cfg.to_toml())
        rows.append({"run": name, "run_dir": str(run_dir)})
    return rows


def test_report_names_each_key_the_runs_differ_in(tmp_path):
    rows = fake_runs(tmp_path, {
        "a": ["privacy.epsilon=1", "seed=1"],
        "b": ["privacy.epsilon=4", "seed=2", "privacy.level=user"],
        "c": ["rounds=5", "data.dataset=digits", "train.model=cnn", "name=other",
              'tracking.mlflow="./mlruns"']})
    lines = report.config_differences(rows)
    assert [line.split(",")[0].split(" differ in ")[1] for line in lines] == [
        "rounds", "data.dataset", "train.model"]
    assert lines[0] == ("the runs compared differ in rounds, which the sweep does not vary: "
                        "2 in 2 run(s): a, b; 5 in 1 run(s): c")
    assert "'adult' in 2 run(s): a, b; 'digits' in 1 run(s): c" in lines[1]
    page = report.html_report([], ["level"], [], [], lines)
    assert page.count("<li>the runs compared differ in") == 3
    assert report.config_differences(rows[:2]) == []  # ε, seed and level are swept


@pytest.mark.slow
def test_privet_report_warns_on_the_console_and_in_the_page(tracked, tracked_grid, tmp_path):
    run_dir = tracked[0]  # rounds = 2; the grid's runs: rounds = 1
    out = tracked_grid[1]
    done = privet("report", str(out / "runs" / RUNS[0]), str(run_dir), "--out",
                  str(tmp_path / "mixed"))
    assert done.returncode == 0, done.stdout + done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "differ in rounds" in warnings[0], done.stderr
    assert f"1 in 1 run(s): {RUNS[0]}" in warnings[0]
    page = (tmp_path / "mixed" / report.HTML).read_text()
    assert "differ in more than the swept keys" in page and "differ in rounds" in page
    alone = privet("report", str(out), "--out", str(tmp_path / "grid"))
    assert alone.returncode == 0 and "warning" not in alone.stderr, alone.stderr
