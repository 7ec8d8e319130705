"""Client data pipelines end to end through Flower's simulation runtime: a user's CSV
files with bad cells and a too-small client, and federated preprocessing whose noise is
accounted in every client's ledger (checked against dp-accounting directly)."""

import json

import dp_accounting
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from test_simulation import TINY, privet, rows

from privet.common.config import load_config
from privet.common.data import adult
from privet.common.data.datasets import client_data, client_holdout
from privet.common.evaluation import evaluate
from privet.common.models import build_model


def run(out, *settings: str) -> tuple[int, str]:
    args = ["simulate", "--config", str(TINY), "--out", str(out)]
    for setting in settings:
        args += ["--set", setting]
    proc = privet(*args)
    stdout, _ = proc.communicate(timeout=300)
    return proc.returncode, stdout


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clients")
    raw = adult.load_raw("train")
    header = ",".join(adult.COLUMNS)
    sizes = {"client0.csv": (0, 700), "client1.csv": (700, 1400), "client2.csv": (1400, 1430)}
    for name, (start, stop) in sizes.items():
        lines = [",".join(cells) for cells in raw.iloc[start:stop].itertuples(index=False)]
        if name == "client1.csv":
            lines[3] = lines[3].replace(lines[3].split(",")[0], "forty", 1)  # bad age
        if name == "client0.csv":
            lines.insert(10, "39,State-gov,77516")  # a truncated line: skipped and counted
        (folder / name).write_text(header + "\n" + "\n".join(lines) + "\n")
    test = folder.parent / "test.csv"
    raw.iloc[2000:3000].to_csv(test, index=False, header=adult.COLUMNS)
    out = tmp_path_factory.mktemp("csv") / "run"
    code, stdout = run(out, "data.dataset=csv", f"data.path={json.dumps(str(folder))}",
                       "data.label=income", f"data.test-path={json.dumps(str(test))}",
                       "data.bad-lines=skip", "name=csv")
    return out, code, stdout


def test_csv_folder_run_completes_and_reports_every_client(csv_run):
    out, code, stdout = csv_run
    assert code == 0, stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["accuracy"] > 0.7
    partitions = rows(out / "partitions.csv")
    assert [int(r["rows"]) for r in partitions] == [700, 700, 30]
    assert summary["data"]["1"]["unparseable_numbers"] == 1   # "forty" counted, imputed
    assert summary["privacy"]["clients"]["2"]["left_out"] == "too-small"
    statuses = [(r["round"], r["client"], r["status"]) for r in rows(out / "metrics.csv")]
    assert ("1", "2", "too-small") in statuses
    assert not [s for s in statuses if s[0] == "2" and s[1] == "2"]  # not sampled again
    assert "30 (< batch)" in stdout and "left out: too few rows" in stdout
    said = " ".join(stdout.split())  # rich wraps long lines
    assert "client1.csv: column 'age': 1 non-numeric value(s), e.g. line 5: 'forty'" in said
    assert "client0.csv: skipped 1 line(s) with the wrong number of fields" in said
    assert len(summary["data_warnings"]) == 2


def test_a_bad_csv_line_stops_the_run_naming_file_and_line(tmp_path):
    bad = tmp_path / "data.csv"
    bad.write_text("age,colour,income\n30,red,yes\n40,blue\n50,red,no\n")
    code, stdout = run(tmp_path / "run", "data.dataset=csv",
                       f"data.path={json.dumps(str(bad))}", "data.label=income")
    assert code == 2, stdout[-2000:]
    assert "data.csv, line 3" in stdout and "expected 3" in stdout


def test_federated_preprocessing_is_accounted_in_each_ledger(tmp_path):
    out = tmp_path / "run"
    code, stdout = run(out, "preprocess.fit=federated", "preprocess.epsilon=0.5",
                       "preprocess.max-categories=8")
    assert code == 0, stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preprocess"]["fit"] == "federated" and summary["accuracy"] > 0.75
    transform = json.loads((out / "transform.json").read_text())
    assert all(len(c["vocabulary"]) <= 8 for c in transform["categorical"])
    delta = summary["privacy"]["delta"]
    for client in summary["privacy"]["clients"].values():
        (sigma, q, count), *dpsgd = client["history"]
        assert (q, count) == (1.0, 1)
        # the statistics alone: one Gaussian mechanism, computed without sampling wrappers
        alone = pld_privacy_accountant.PLDAccountant()
        alone.compose(dp_accounting.GaussianDpEvent(sigma))
        assert alone.get_epsilon(delta) == pytest.approx(0.5, rel=0.01)
        assert alone.get_epsilon(delta) <= 0.5 + 1e-3
        total = pld_privacy_accountant.PLDAccountant()
        total.compose(dp_accounting.GaussianDpEvent(sigma))
        for s, rate, steps in dpsgd:
            total.compose(dp_accounting.PoissonSampledDpEvent(
                rate, dp_accounting.GaussianDpEvent(s)), int(steps))
        independent = total.get_epsilon(delta)
        assert client["epsilon"] == pytest.approx(independent, rel=0.01)
        assert independent <= 2.0 * 1.001  # the run's target covers both


def test_federated_evaluation_averages_the_clients_held_out_rows(tmp_path):
    """The server holds no data: its accuracy is the example-weighted mean of what the
    clients measure on their held-out rows, recomputed here from the saved model."""
    out = tmp_path / "run"
    code, stdout = run(out, "evaluation.mode=federated", "evaluation.holdout=0.25")
    assert code == 0, stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluation"] == "federated" and "held-out accuracy" in stdout
    cfg = load_config(out / "config.toml")
    shared = (out / "transform.json").read_text()  # the default: one federated fit
    model = build_model(cfg.train, client_data(cfg, 0, shared).features.shape[1:], 2)
    model.load_state_dict(torch.load(out / "model.pt")["state_dict"])
    correct = total = 0
    for client in range(cfg.num_clients):
        held_out = client_holdout(cfg, client, shared)
        train_rows = len(client_data(cfg, client, shared))
        assert abs(len(held_out) - 0.25 * (len(held_out) + train_rows)) <= 1
        _, accuracy = evaluate(model, held_out.features, held_out.labels)
        correct, total = correct + accuracy * len(held_out), total + len(held_out)
    assert summary["accuracy"] == pytest.approx(correct / total, abs=1e-6)
    partitions = rows(out / "partitions.csv")  # from the clients' own descriptions
    assert [int(r["rows"]) for r in partitions] == [5060, 19077, 8424]
