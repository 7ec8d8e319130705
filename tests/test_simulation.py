"""End to end through Flower's simulation runtime (Ray), as a user runs it."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_DIR, free_port
from independent import pld_epsilon

from privet.common.config import CONFIGS_DIR, load_config

TINY = CONFIGS_DIR / "tiny.toml"


def ray_pids() -> set[int]:
    done = subprocess.run(["pgrep", "-f", "raylet|gcs_server|ray::"], capture_output=True,
                          text=True)
    return {int(p) for p in done.stdout.split()}


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs of this user's processes whose environment sets `name` to `value` (a value unique
    to a test, such as its temporary FLWR_HOME): ours, whatever they are called."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"{name}={value}".encode() in environ:
            found.append(int(entry.name))
    return found


def privet(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "privet.experiments.cli", *args], cwd=PROJECT_DIR, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        # a shell's background job ignores SIGINT; a user's terminal does not
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_no_new_ray_processes(before: set[int]) -> None:
    deadline = time.time() + 15
    while ray_pids() - before and time.time() < deadline:
        time.sleep(0.5)
    left = ray_pids() - before
    assert not left, "Ray processes outlived the run: " + subprocess.run(
        ["ps", "-o", "pid,ppid,etime,cmd", "-p", ",".join(map(str, left))],
        capture_output=True, text=True).stdout[:2000]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    before = ray_pids()
    # client 1 asks for a tighter budget than the others
    proc = privet("simulate", "--config", str(TINY), "--out", str(out),
                  "--set", "privacy.client-epsilon={ 1 = 1.0 }")
    stdout, _ = proc.communicate(timeout=300)
    return out, proc.returncode, stdout, before


def test_tiny_run_completes_and_writes_results(tiny_run):
    out, code, stdout, before = tiny_run
    assert code == 0, stdout
    cfg = load_config(TINY, ["privacy.client-epsilon={ 1 = 1.0 }"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds"] == cfg.rounds
    assert 0.6 < summary["accuracy"] <= 1 and summary["wall_seconds"] > 0
    assert summary["privacy"]["level"] == "sample"
    assert summary["privacy"]["delta"] == cfg.privacy.delta
    assert summary["privacy"]["accountant"] == cfg.privacy.accountant
    assert set(summary["privacy"]["clients"]) == {str(i) for i in range(cfg.num_clients)}
    assert len(rows(out / "metrics.csv")) == cfg.rounds * cfg.num_clients
    # each client cleaned its own rows and says what cleaning did; together they hold the file
    data = summary["data"]
    assert sum(d["rows_in"] for d in data.values()) == 32561
    assert sum(d["duplicates_dropped"] for d in data.values()) >= 0
    assert all(d["rows_out"] == d["rows_in"] - d["duplicates_dropped"] for d in data.values())
    assert [int(r["round"]) for r in rows(out / "rounds.csv")] == list(range(1, cfg.rounds + 1))
    assert load_config(out / "config.toml", [f"out-dir={cfg.out_dir}"]) == cfg
    model = torch.load(out / "model.pt")
    assert model["round"] == cfg.rounds and "1.weight" in model["state_dict"]
    assert (out / "accuracy_epsilon.png").stat().st_size > 1000
    assert f"round   1/{cfg.rounds}" in stdout and "test accuracy" in stdout
    assert_no_new_ray_processes(before)


def test_reported_epsilon_is_cumulative_and_matches_an_independent_accountant(tiny_run):
    out, _, _, _ = tiny_run
    cfg = load_config(TINY, ["privacy.client-epsilon={ 1 = 1.0 }"])
    summary = json.loads((out / "summary.json").read_text())
    per_round = {}
    for row in rows(out / "metrics.csv"):
        per_round.setdefault(row["client"], []).append(row)
    for client, entry in summary["privacy"]["clients"].items():
        history = entry["history"]
        assert entry["target_epsilon"] == cfg.epsilon_for(int(client))
        assert 0.95 * entry["target_epsilon"] <= entry["epsilon"] <= entry["target_epsilon"]
        reference = pld_epsilon(history, cfg.privacy.delta)
        assert reference * (1 - 1e-9) <= entry["epsilon"] <= reference * 1.01
        epsilons = [float(r["epsilon"]) for r in per_round[client]]
        assert all(a < b for a, b in zip(epsilons, epsilons[1:])), epsilons
        # the preprocessing statistics, then the DP-SGD steps of every round
        assert entry["purposes"] == ["statistics", "dp-sgd"]
        statistics, (sigma, q, total_steps) = history
        # the ε after round 1 covers exactly round 1's steps: no reset, no double count
        steps = int(per_round[client][0]["steps"])
        assert epsilons[0] == pytest.approx(
            pld_epsilon([statistics, (sigma, q, steps)], cfg.privacy.delta), rel=0.01)
        assert sum(int(r["steps"]) for r in per_round[client]) == total_steps


# The tiny run as the code before the speed work (commit fc936a3: Opacus ghost clipping,
# dp-accounting's PLDAccountant, torch's SGD and DataLoader) computed it: per client the
# calibrated σ, Poisson rate, steps, and the ε it reported.
BEFORE_SPEED_WORK = {
    "0": (0.9252055659375003, 0.025, 80, 1.998058307701002),
    "1": (0.8878386206250004, 0.006711409395973154, 298, 0.9977639734253992),
    "2": (0.8346093750000001, 0.015151515151515152, 132, 1.9967258868010473),
}
BEFORE_SPEED_WORK_ACCURACY = 0.845218


@pytest.fixture(scope="module")
def pinned_run(tmp_path_factory):
    """The tiny run with preprocessing and averaging as they were then (each client fitted
    exactly on its own rows, now only with preprocess.epsilon = inf, outside every ε; FedAvg
    weighted by examples, now strategy.weighting = "examples")."""
    out = tmp_path_factory.mktemp("pinned") / "run"
    proc = privet("simulate", "--config", str(TINY), "--out", str(out),
                  "--set", "privacy.client-epsilon={ 1 = 1.0 }", "--set", "preprocess.fit=local",
                  "--set", "preprocess.epsilon=inf", "--set", 'strategy.weighting="examples"')
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout[-3000:]
    return out


def test_speed_work_left_the_results_unchanged(pinned_run):
    """Same seed, same results: σ and steps exactly, ε to 1e-9 (float rounding in composing
    the PLD), accuracy within 0.005 (summation order differs between clipping methods; the
    steps themselves are the same, see tests/test_train.py). If tiny.toml or the data
    pipeline changes on purpose, re-pin these from a run of the code before the speed work.
    Seeded noise sources, the per-row ledger and the DP preprocessing left them unchanged."""
    out = pinned_run
    summary = json.loads((out / "summary.json").read_text())
    for client, (sigma, q, steps, epsilon) in BEFORE_SPEED_WORK.items():
        entry = summary["privacy"]["clients"][client]
        assert entry["history"] == [[sigma, q, steps]], client
        assert entry["epsilon"] == pytest.approx(epsilon, rel=1e-9), client
    assert summary["accuracy"] == pytest.approx(BEFORE_SPEED_WORK_ACCURACY, abs=0.005)


def test_non_private_run(tmp_path):
    proc = privet("simulate", "--config", str(TINY), "--set", "privacy.level=none",
                  "--set", "rounds=1", "--out", str(tmp_path / "run"))
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["privacy"]["level"] == "none" and summary["privacy"]["max_epsilon"] is None
    assert all(c["epsilon"] is None for c in summary["privacy"]["clients"].values())
    assert summary["accuracy"] > 0.7


def test_ctrl_c_stops_cleanly_and_keeps_finished_rounds(tmp_path):
    out = tmp_path / "run"
    before = ray_pids()
    proc = privet("simulate", "--config", str(TINY), "--set", "rounds=200", "--out", str(out))
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "rounds.csv").exists() and len(rows(out / "rounds.csv")) >= 1:
            break
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.3)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, _ = proc.communicate(timeout=90)
    assert proc.returncode == 130, stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted", stdout
    finished = rows(out / "rounds.csv")
    assert 1 <= len(finished) < 200 and summary["rounds"] == len(finished)
    assert "Traceback" not in stdout
    assert_no_new_ray_processes(before)


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_flwr_run_runs_the_app_on_a_local_simulation_federation(tmp_path):
    """The repository is a Flower App: `flwr run .` works, as the README says, with a user's
    model from the app folder (Flower ships it in the FAB)."""
    home = tmp_path / "flwr-home"
    # Flower's local SuperLink listens on fixed ports (39091, 39093) unless told otherwise:
    # free ones, so that this never submits to someone else's SuperLink
    env = {**os.environ, "FLWR_HOME": str(home),
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = tmp_path / "run"
    try:
        done = subprocess.run(
            ["flwr", "run", ".", "--stream",
             "--run-config", f'rounds=1 num-clients=3 clients-per-round=3 out-dir="{out}" '
                             'train.model="experiments.examples.tabular:residual_mlp"',
             "--federation-config", "num-supernodes=3 client-resources-num-cpus=1"],
            cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "complete" and summary["rounds"] == 1
        assert len(summary["privacy"]["clients"]) == 3
        assert "residual_mlp" in (out / "config.toml").read_text()
    finally:  # `flwr run` leaves its local SuperLink running: stop ours, by its PID
        for pid in processes_with_env("FLWR_HOME", str(home)):
            os.kill(pid, signal.SIGTERM)
