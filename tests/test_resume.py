"""Resume (issue 16.1): a run stopped after round k — paused, Ctrl-C, SIGTERM, SIGKILL — and
resumed with `privet simulate --resume` ends with the model and the ε of the uninterrupted
run; a round the server never checkpointed is charged once under seeded noise (the replay
draws the same noise from the same inputs) and again under secure noise (new noise)."""

import json
import math
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_DIR
from independent import pld_epsilon
from test_simulation import privet, rows

from privet.common.config import CONFIGS_DIR
from privet.common.run_dir import mark
from privet.common.privacy.ledger import DataLedger, RunFileStore, Spend, SpendRecord

TINY = CONFIGS_DIR / "tiny.toml"
# everything a round carries into the next: client and user-level ledgers, the user-level
# noise stream and Poisson sampling (p = 1/2), the adaptive clip, FedAdam's moments
RICH = ["privacy.level=both", "privacy.user-clipping=adaptive", "privacy.user-count-stddev=2",
        'strategy.name="fedadam"',
        "num-clients=4", "clients-per-round=2", "train.hidden=8"]


def simulate(*args: str, timeout: float = 600) -> tuple[int, str]:
    proc = privet("simulate", *args)
    stdout, _ = proc.communicate(timeout=timeout)
    return proc.returncode, stdout


def settings(*values: str) -> list[str]:
    return [a for v in values for a in ("--set", v)]


def start(out: Path, rounds: int, extra: list[str], *args: str) -> tuple[int, str]:
    return simulate("--config", str(TINY), "--out", str(out), *args,
                    *settings(f"rounds={rounds}", *extra))


def model(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model.pt", weights_only=True)["state_dict"]


def ledgers(out: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text())[0] for p in (out / "ledgers").glob("*.json")}


def assert_same_run(resumed: Path, full: Path, model_tolerance: float | None = 1e-6) -> None:
    one, two = (json.loads((d / "summary.json").read_text()) for d in (resumed, full))
    assert one["status"] == two["status"] == "complete"
    assert one["rounds"] == two["rounds"]
    assert [r["round"] for r in rows(resumed / "rounds.csv")] == [
        str(i) for i in range(1, two["rounds"] + 1)]  # each round once
    for client, spent in two["privacy"]["clients"].items():
        assert one["privacy"]["clients"][client]["epsilon"] == pytest.approx(
            spent["epsilon"], abs=1e-9)
        assert one["privacy"]["clients"][client]["rounds_trained"] == spent["rounds_trained"]
    if two["privacy"]["user_level"]:
        assert one["privacy"]["user_level"]["epsilon"] == pytest.approx(
            two["privacy"]["user_level"]["epsilon"], abs=1e-9)
    if model_tolerance is not None:
        a, b = model(resumed), model(full)
        assert max(float((a[k] - b[k]).abs().max()) for k in b) <= model_tolerance
        columns = ("test_accuracy", "test_loss", "max_epsilon", "user_epsilon")
        assert [[r[c] for c in columns] for r in rows(resumed / "rounds.csv")] == \
            [[r[c] for c in columns] for r in rows(full / "rounds.csv")]


# --- the ledger's rule for a round done twice: no simulation -----------------------------

@pytest.mark.parametrize("source", ["seeded", "secure"])
def test_a_replayed_release_costs_nothing_seeded_and_again_secure(tmp_path, source):
    path = tmp_path / "ledgers" / "client-0.json"
    spend, delta = Spend(1.1, 0.02, 50), 1e-5

    def ledger() -> DataLedger:  # what a client opens for each message
        return DataLedger(RunFileStore(path), SpendRecord("r-client0", "r", "0", "adult", "",
                                                          source), None)

    for round_ in (1, 2):
        assert ledger().reserve([spend], 10.0, delta, "pld", (f"train-{round_}", "m")) > 0
    # round 2 again, from the same model (a resumed run replaying it)
    again = ledger().reserve([spend], 10.0, delta, "pld", ("train-2", "m"))
    paid = 2 if source == "seeded" else 3
    assert again == pytest.approx(pld_epsilon([(1.1, 0.02, 50 * paid)], delta), rel=2e-3)
    assert ledger().current.history == ((1.1, 0.02, 50 * paid),)
    # from another model: paid again, and (seeded) a later attempt's noise, never the first's
    other = ledger()
    other.reserve([spend], 10.0, delta, "pld", ("train-2", "other"))
    assert other.current.history == ((1.1, 0.02, 50 * (paid + 1)),)
    assert other.attempt("train-2", "other") == (1 if source == "seeded" else 2)
    assert other.attempt("train-2", "m") == 0


# --- pause and resume (whole runs: CI's slow job) ------------------------------------------

@pytest.fixture(scope="module")
def paused(tmp_path_factory):
    """The rich config for 4 rounds uninterrupted, and paused after round 2 then resumed."""
    root = tmp_path_factory.mktemp("resume")
    full, part = root / "full", root / "part"
    code, stdout = start(full, 4, RICH)
    assert code == 0, stdout[-3000:]
    code, first = start(part, 4, RICH, "--pause-after", "2")
    assert code == 0, first[-3000:]
    summary = json.loads((part / "summary.json").read_text())
    summary["rounds.csv"] = len(rows(part / "rounds.csv"))
    code, second = simulate("--resume", str(part))
    return full, part, first, second, code, summary


@pytest.mark.slow
def test_a_paused_run_says_how_to_go_on(paused):
    full, part, first, _, _, summary = paused
    assert summary["status"] == "paused" and summary["rounds"] == 2
    assert f"privet simulate --resume {part}" in first
    assert summary["rounds.csv"] == 2


@pytest.mark.slow
def test_paused_and_resumed_ends_as_the_uninterrupted_run(paused):
    full, part, _, second, code, summary = paused
    assert code == 0, second[-3000:]
    assert "resuming after round 2 of 4" in second
    assert "round   1/4" not in second and "round   3/4" in second
    assert_same_run(part, full)
    resumed = json.loads((part / "summary.json").read_text())
    assert resumed["run_id"] == summary["run_id"]  # the same run: its ledgers go on
    # preprocessing statistics were fitted (and paid) once, before round 1
    for name, record in ledgers(part).items():
        assert sum(p == "statistics" for *_, p in record["spends"]) <= 1, (name, record)
        assert all(len(f) == 1 for f in record["releases"].values()), (name, record)
    spends = {n: r["spends"] for n, r in ledgers(part).items()}
    assert spends == {n: r["spends"] for n, r in ledgers(full).items()}


@pytest.mark.slow
def test_resume_refuses_what_it_cannot_continue(paused, tmp_path):
    full, part, *_ = paused
    code, stdout = simulate("--resume", str(full))
    assert code == 2 and "the run is complete: there is nothing to resume" in stdout
    code, stdout = simulate("--resume", str(part), "--set", "rounds=9")
    assert code == 2 and "--resume continues a run with the config it started with" in stdout
    bare = mark(tmp_path / "bare", "--out")  # a privet run folder without a checkpoint
    shutil.copy(full / "config.toml", bare / "config.toml")
    code, stdout = simulate("--resume", str(bare))
    assert code == 2 and "no checkpoint" in stdout and "Traceback" not in stdout
    code, stdout = simulate("--resume", str(tmp_path / "nothing"))
    assert code == 2 and "not a privet run directory" in stdout


# --- stopped by a signal mid-round (slow: CI runs them) -----------------------------------

def _run_until(out: Path, rounds: int, extra: list[str], finished: int, sig: int
               ) -> subprocess.Popen:
    """Start a run and send `sig` once `finished` rounds are in rounds.csv (the next one is
    then in flight)."""
    proc = privet("simulate", "--config", str(TINY), "--out", str(out),
                  *settings(f"rounds={rounds}", *extra))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "rounds.csv").exists() and len(rows(out / "rounds.csv")) >= finished:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_stopped_by_a_signal_and_resumed_ends_as_the_uninterrupted_run(tmp_path, sig):
    full, part = tmp_path / "full", tmp_path / "part"
    assert start(full, 6, RICH)[0] == 0
    _run_until(part, 6, RICH, 3, sig)
    code, stdout = simulate("--resume", str(part))
    assert code == 0, stdout[-3000:]
    assert_same_run(part, full)
    # a round the server had not checkpointed was replayed from the same model with the
    # same seeded noise: paid once
    for name, record in ledgers(part).items():
        assert all(len(f) == 1 for f in record["releases"].values()), (name, record)
    assert {n: r["spends"] for n, r in ledgers(part).items()} == \
        {n: r["spends"] for n, r in ledgers(full).items()}


SECURE = ['privacy.noise-source="secure"', "num-clients=3", "clients-per-round=3"]


@pytest.mark.slow
def test_secure_noise_pause_keeps_the_epsilon_and_a_kill_pays_the_redone_round(tmp_path):
    full, part, killed = tmp_path / "full", tmp_path / "part", tmp_path / "killed"
    assert start(full, 4, SECURE)[0] == 0
    assert start(part, 4, SECURE, "--pause-after", "2")[0] == 0
    assert simulate("--resume", str(part))[0] == 0
    assert_same_run(part, full, model_tolerance=None)  # new noise: another model
    _run_until(killed, 4, SECURE, 2, signal.SIGKILL)
    code, stdout = simulate("--resume", str(killed))
    assert code == 0, stdout[-3000:]
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds"] == 4
    spent = summary["privacy"]["clients"]
    before = json.loads((full / "summary.json").read_text())["privacy"]["clients"]
    full_ledgers = ledgers(full)
    for name, record in ledgers(killed).items():
        client = name.removeprefix("client-").removesuffix(".json")
        paid = sum(len(f) for f in record["releases"].values())  # train rounds paid for
        redone = paid - len(record["releases"])
        steps = sum(s[2] for s in record["spends"] if s[3] == "dp-sgd")
        per_round = sum(s[2] for s in full_ledgers[name]["spends"] if s[3] == "dp-sgd") // 4
        assert steps == per_round * paid, (name, record)
        # a redone round was paid again: calibrated for 4 rounds, such a client declines the
        # last one rather than pass its target
        assert spent[client]["rounds_trained"] == 4 - redone
        # its ε is the composition of everything recorded, recomputed by dp-accounting
        history = [(s[0], s[1], s[2]) for s in record["spends"]]
        assert spent[client]["epsilon"] == pytest.approx(
            pld_epsilon(history, summary["privacy"]["delta"]), rel=5e-3)
        assert spent[client]["epsilon"] <= summary["privacy"]["target_epsilon"]
        if not redone:
            assert spent[client]["epsilon"] == pytest.approx(before[client]["epsilon"],
                                                             abs=1e-9)


# --- privet compare goes on with a stopped grid point ---------------------------------------

@pytest.mark.slow
def test_compare_resumes_a_stopped_grid_point(tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(TINY), "--set", "rounds=3", "--epsilons", "1",
            "--seeds", "1", "--levels", "sample", "--no-audit", "--out", str(out)]
    run_dir = out / "runs" / "sample-eps1-seed7"
    # a grid point stopped after round 1, as an interrupted compare leaves it (in folders
    # privet made)
    mark(out, "--out")
    mark(run_dir, "--out")
    code, stdout = simulate("--config", str(TINY), "--out", str(run_dir), "--pause-after", "1",
                            *settings("rounds=3", "privacy.epsilon=1", "seed=7",
                                      "privacy.level=sample"))
    assert code == 0, stdout[-3000:]
    done = subprocess.run([sys.executable, "-m", "privet.experiments.cli", *args],
                          cwd=PROJECT_DIR, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed after round 1" in done.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds"] == 3
    assert [r["round"] for r in rows(run_dir / "rounds.csv")] == ["1", "2", "3"]
    assert not math.isnan(summary["accuracy"])


def test_a_second_run_into_a_stopped_one_is_told_how_to_resume(tmp_path):
    from privet.experiments.cli import _resume_hint

    (tmp_path / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    assert _resume_hint(tmp_path) == ""  # no checkpoint: nothing to resume from
    (tmp_path / "checkpoint.pkl").write_bytes(b"")
    assert f"continue it with privet simulate --resume {tmp_path}" in _resume_hint(tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "complete"}))
    assert _resume_hint(tmp_path) == ""


@pytest.mark.slow
def test_python_api_pauses_and_resumes(tmp_path):
    import privet

    run = privet.simulate(TINY, {"rounds": 3, "num-clients": 2, "clients-per-round": 2},
                          out=tmp_path / "run", pause_after=1, verbose=False)
    assert run.summary["status"] == "paused" and len(run.rounds) == 1
    with pytest.raises(privet.PrivetError, match="--pause-after 1: the run has finished"):
        privet.resume(run.path, pause_after=1, verbose=False)
    again = privet.resume(run.path, verbose=False)
    assert again.summary["status"] == "complete" and list(again.rounds["round"]) == [1, 2, 3]


@pytest.mark.slow
def test_a_ledger_file_gone_or_shorter_stops_the_resume(tmp_path):
    """A resumed run must never start a client's spend from less than it spent."""
    out = tmp_path / "run"
    code, stdout = start(out, 3, ["num-clients=2", "clients-per-round=2"], "--pause-after", "1")
    assert code == 0, stdout[-3000:]
    ledger = out / "ledgers" / "client-1.json"
    kept = ledger.read_text()
    ledger.unlink()
    code, stdout = simulate("--resume", str(out))
    assert code == 2 and "Traceback" not in stdout
    assert f"{ledger}: client 1's privacy ledger is missing or holds less" in stdout
    # emptied of this run's DP-SGD steps: shorter than the client reported
    records = json.loads(kept)
    records[0]["spends"] = [s for s in records[0]["spends"] if s[3] != "dp-sgd"]
    ledger.write_text(json.dumps(records))
    code, stdout = simulate("--resume", str(out))
    assert code == 2 and "client 1's privacy ledger is missing or holds less" in stdout
    ledger.write_text(kept)
    code, stdout = simulate("--resume", str(out))
    assert code == 0, stdout[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_a_resumed_run_goes_on_in_its_mlflow_run(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # to read it back here
    store = f"file://{tmp_path / 'mlruns'}"
    out = tmp_path / "run"
    code, stdout = start(out, 3, ["num-clients=2", "clients-per-round=2",
                                  f'tracking.mlflow="{store}"'], "--pause-after", "1")
    assert code == 0, stdout[-3000:]
    assert simulate("--resume", str(out))[0] == 0
    client = MlflowClient(store)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    history = client.get_metric_history(runs[0].info.run_id, "test_accuracy")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert [float(r["test_accuracy"]) for r in rows(out / "rounds.csv")] == pytest.approx(
        [m.value for m in sorted(history, key=lambda m: m.step)])
