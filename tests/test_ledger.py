"""The privacy ledger on disk: restarts resume spent budget; exhausted clients decline."""

import json

import pytest
from test_simulation import privet, rows

from common.config import CONFIGS_DIR, load_config
from common.privacy.ledger import LedgerFile, PrivacyLedger

TINY = CONFIGS_DIR / "tiny.toml"


def test_ledger_file_round_trip_and_damage(tmp_path):
    file = LedgerFile(tmp_path, "exp-1", "client0")
    assert file.load().history == []
    ledger = PrivacyLedger()
    ledger.record(1.2, 0.01, 300)
    file.save(ledger)
    assert file.load().history == [(1.2, 0.01, 300)]
    file.path.write_text("{not json")
    with pytest.raises(ValueError, match="privacy ledger unreadable"):
        file.load()


def test_experiment_identity_ignores_only_where_results_go():
    base = load_config(TINY)
    assert base.experiment_id() == load_config(TINY, ["out-dir=/x", "privacy.on-exhausted=stop",
                                                      "privacy.ledger-dir=/y"]
                                               ).experiment_id()
    assert base.experiment_id() != load_config(TINY, ["privacy.epsilon=1"]).experiment_id()


def _run(out, ledgers, *extra):
    proc = privet("simulate", "--config", str(TINY), "--set", f"privacy.ledger-dir={ledgers}",
                  *extra, "--out", str(out))
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    return json.loads((out / "summary.json").read_text())


def test_restarted_clients_resume_their_spent_budget(tmp_path):
    ledgers = tmp_path / "ledgers"
    cfg = load_config(TINY)
    first = _run(tmp_path / "a", ledgers)
    files = sorted(ledgers.glob(f".privet-ledger-{cfg.experiment_id()}-client*.json"))
    assert len(files) == cfg.num_clients
    for file in files:  # on disk: what the summary reports
        client = file.name.rsplit("client", 1)[1].removesuffix(".json")
        history = json.loads(file.read_text())["history"]
        assert history == first["privacy"]["clients"][client]["history"]

    # A crash after round 1: the nodes come back with round 1's spend on disk only.
    for file in files:
        (sigma, q, steps), = json.loads(file.read_text())["history"]
        file.write_text(json.dumps({"history": [[sigma, q, steps // 2]]}))
    resumed = _run(tmp_path / "b", ledgers)
    assert resumed["status"] == "complete"
    for client, entry in resumed["privacy"]["clients"].items():
        # one round left in the budget: train once, then decline and say so
        assert entry["rounds_trained"] == 1 and entry["stopped_round"] == 2, entry
        assert entry["epsilon"] == pytest.approx(first["privacy"]["clients"][client]["epsilon"])
        assert entry["epsilon"] <= cfg.privacy.epsilon
    statuses = [(r["round"], r["status"]) for r in rows(tmp_path / "b" / "metrics.csv")]
    assert statuses.count(("2", "declined")) == cfg.num_clients

    # Budgets now spent: with on-exhausted = stop the run ends after its first round.
    stopped = _run(tmp_path / "c", ledgers, "--set", "privacy.on-exhausted=stop")
    assert stopped["status"] == "budget-exhausted" and stopped["rounds"] == 1
    assert all(c["stopped_round"] == 1 for c in stopped["privacy"]["clients"].values())
