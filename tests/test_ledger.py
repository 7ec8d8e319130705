"""The budget belongs to the data: ledgers keyed by rows, composed over every run, that stop a
client when they cannot be trusted, and forget spend only when told to."""

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from independent import pld_epsilon
from test_simulation import privet, rows
from typer.testing import CliRunner

from privet.common.config import CONFIGS_DIR, load_config
from privet.common.data import adult
from privet.common.data.datasets import partitions
from privet.common.privacy.ledger import (
    ALL_ROWS,
    history_of,
    DataLedger,
    LedgerDir,
    LedgerError,
    Spend,
    SpendRecord,
    row_digests,
)

TINY = CONFIGS_DIR / "tiny.toml"
DELTA = 1e-5
BOUNDS = "data.bounds=" + json.dumps({c: list(b) for c, b in adult.BOUNDS.items()}) \
    .replace(":", " =").replace('"', "")


def _record(run="r1", client="0", rows=ALL_ROWS, spends=((1.0, 0.02, 100),)):
    return SpendRecord(f"{run}-client{client}", run, client, "test", rows, "seeded",
                       [Spend(*s) for s in spends])


@pytest.fixture
def store(tmp_path):
    return LedgerDir(tmp_path / "data")  # its copy under $PRIVET_STATE_DIR (conftest)


# --- the folder and its copy ---------------------------------------------------------------

def test_a_record_on_disk_round_trips_and_has_a_copy(store):
    record = _record()
    store.save(record)
    assert store.records() == [record]
    assert (store.copy / "spend" / record.file_name).is_file()


@pytest.mark.parametrize("damage", ["{}", '{"history": []}', "", "\x00\xff garbage",
                                    "EMPTY_SPENDS"])
def test_an_emptied_or_damaged_ledger_stops_the_client_naming_the_file(store, damage):
    record = _record()
    store.save(record)
    path = store.root / "spend" / record.file_name
    if damage == "EMPTY_SPENDS":
        data = record.to_dict()
        data["spends"] = []
        damage = json.dumps(data)
    path.write_text(damage, encoding="utf-8", errors="surrogateescape")
    with pytest.raises(LedgerError) as error:
        store.records()
    message = str(error.value)
    assert str(path) in message and "\n" not in message
    assert "--forget r1-client0 --yes" in message  # the one explicit way out


def test_a_deleted_ledger_is_noticed_through_its_copy(store):
    record = _record()
    store.save(record)
    (store.root / "spend" / record.file_name).unlink()
    with pytest.raises(LedgerError, match="missing, while its copy records spend"):
        store.records()
    shutil.rmtree(store.root)  # the whole folder gone: the same
    with pytest.raises(LedgerError, match="missing"):
        store.records()


def test_a_ledger_that_lost_steps_is_noticed_through_its_copy(store):
    record = _record(spends=((1.0, 0.02, 100),))
    store.save(record)
    shorter = _record(spends=((1.0, 0.02, 40),))
    (store.root / "spend" / record.file_name).write_text(json.dumps(shorter.to_dict()))
    with pytest.raises(LedgerError, match="differs from its copy: its spend is not the copy"):
        store.records()


def test_forgetting_spend_is_an_explicit_command(tmp_path, store):
    from privet.experiments.cli import app

    store.save(_record(run="r1"))
    store.save(_record(run="r2", client="1"))
    runner = CliRunner()
    refused = runner.invoke(app, ["ledger", str(tmp_path / "data"), "--forget", "r1"])
    assert refused.exit_code == 2 and "add --yes" in refused.output
    assert len(store.records()) == 2
    done = runner.invoke(app, ["ledger", str(tmp_path / "data"), "--forget", "r1", "--yes"])
    assert done.exit_code == 0, done.output
    assert [r.id for r in store.records()] == ["r2-client1"]
    unknown = runner.invoke(app, ["ledger", str(tmp_path / "data"), "--forget", "nope", "--yes"])
    assert unknown.exit_code == 2 and "no record or run nope" in unknown.output


def test_older_ledgers_are_read_as_covering_every_row_never_dropped(tmp_path):
    (tmp_path / ".privet-ledger-tiny-abc-client0.json").write_text(
        json.dumps({"history": [[1.2, 0.01, 300]]}))
    store = LedgerDir(tmp_path, copy_root=tmp_path / "state")
    ledger = DataLedger(store, _record(run="new", spends=()), row_digests([["a"], ["b"]]))
    assert ledger.prior_histories() == [((1.2, 0.01, 300),)]
    (tmp_path / ".privet-ledger-tiny-abc-client0.json").write_text("{}")
    with pytest.raises(LedgerError, match="older privet"):
        store.records()


# --- spend follows the rows ----------------------------------------------------------------

def test_each_row_composes_every_record_that_touched_it(store):
    """Client rows 0..119; run A touched rows 0..99, run B rows 50..149: rows 50..99 carry
    both, and the client's ε is theirs (dp-accounting on the composition)."""
    digests = row_digests([["row", i] for i in range(150)])
    a, b = (1.0, 0.02, 200), (0.8, 0.05, 50)
    for run, covered, spend in (("A", digests[:100], a), ("B", digests[50:], b)):
        record = _record(run=run, rows=store.save_rows(np.unique(covered)), spends=(spend,))
        store.save(record)
    mine = np.unique(digests[:120])
    ledger = DataLedger(store, _record(run="now", client="7", spends=()), mine)
    # rows 0..49 (A) and 100..119 (B) spent a subset of what rows 50..99 (A and B) did
    assert ledger.prior_histories() == [(a, b)]
    assert ledger.epsilon(DELTA, "pld") == pytest.approx(pld_epsilon([a, b], DELTA), rel=0.01)
    assert not ledger.conservative
    # rows it does not hold are not charged to it
    others = DataLedger(store, _record(run="now", client="8", spends=()),
                        row_digests([["someone else", 1]]))
    assert others.epsilon(DELTA, "pld") == 0.0


def test_identical_rows_are_distinct_records_and_order_decides_which():
    first = row_digests([["x", 1], ["y", 2], ["x", 1]])
    assert len(set(first.tolist())) == 3
    appended = row_digests([["x", 1], ["y", 2], ["x", 1], ["z", 3], ["x", 1]])
    assert (appended[:3] == first).all()  # rows appended after: the old rows' digests hold


# --- a deployed node: its ledger sits next to its data -----------------------------------

def _node(tmp_path, partition_id, data_path):
    return SimpleNamespace(node_config={"data-path": str(data_path),
                                        "partition-id": partition_id}, state={})


def _write_adult(path, start, stop):
    raw = adult.load_raw("train").iloc[start:stop]
    raw.to_csv(path, index=False, header=adult.COLUMNS)


def test_a_node_keeps_its_spend_when_its_id_changes_or_rows_are_appended(tmp_path):
    from privet.clients.accounting import open_ledger as _ledger

    data = tmp_path / "mine.csv"
    _write_adult(data, 0, 400)
    cfg = load_config(CONFIGS_DIR / "adult.toml", ["num-clients=3", "clients-per-round=3"])
    first = _ledger(cfg, _node(tmp_path, 0, data), 0, "run-1")
    spend = (0.9, 1 / 7, 140)
    first.record(Spend(*spend))
    # the same rows under another partition-id, another run and another config
    other = load_config(CONFIGS_DIR / "adult.toml", ["num-clients=5", "clients-per-round=2",
                                                     "rounds=3", "name=changed"])
    again = _ledger(other, _node(tmp_path, 4, data), 4, "run-2")
    assert again.prior_histories() == [(spend,)]
    assert again.prior_epsilon(DELTA, "pld") == pytest.approx(pld_epsilon([spend], DELTA),
                                                              rel=0.01)
    # 100 rows appended: the old rows keep their spend, the new ones have none
    _write_adult(data, 0, 500)
    from privet.common.data import datasets

    datasets.node_source.cache_clear()
    datasets.client_digests.cache_clear()
    grown = _ledger(cfg, _node(tmp_path, 0, data), 0, "run-3")
    assert grown.prior_histories() == [(spend,)]  # the old rows are the most spent
    assert grown.prior_epsilon(DELTA, "pld") == pytest.approx(pld_epsilon([spend], DELTA),
                                                              rel=0.01)


def test_a_row_is_the_same_row_however_its_file_is_laid_out(tmp_path):
    """Columns reordered, an extra column, numbers written as 39.0: the same rows, the same
    spend (shared/cases: a harmless re-export used to reset every row's budget)."""
    from privet.clients.accounting import open_ledger
    from privet.common.data import datasets

    data = tmp_path / "mine.csv"
    raw = adult.load_raw("train").iloc[:300]
    raw.to_csv(data, index=False, header=adult.COLUMNS)
    cfg = load_config(CONFIGS_DIR / "adult.toml", ["num-clients=3", "clients-per-round=3"])
    spend = (1.1, 1 / 5, 50)
    open_ledger(cfg, _node(tmp_path, 0, data), 0, "run-1").record(Spend(*spend))
    again = raw[list(reversed(adult.COLUMNS))].copy()
    again["age"] = again["age"].astype(float).map(lambda v: f"{v:.1f}")
    again["row-id"] = range(len(again))
    again.to_csv(data, index=False)
    datasets.node_source.cache_clear()
    datasets.client_digests.cache_clear()
    assert open_ledger(cfg, _node(tmp_path, 0, data), 0, "run-2").prior_histories() == \
        [(spend,)]


def test_too_many_mixes_of_earlier_runs_are_charged_conservatively(store):
    """Rows re-split over and over: past MAX_GROUPS distinct histories every row is charged
    with every record that touched the client's rows (never less than the truth)."""
    from privet.common.privacy import ledger as ledgers

    digests = row_digests([["row", i] for i in range(4 * (ledgers.MAX_GROUPS + 1))])
    records = []
    for k in range(ledgers.MAX_GROUPS + 1):  # record k touches rows 4k..4k+3 only
        record = _record(run=f"r{k}", rows=store.save_rows(np.unique(digests[4 * k:4 * k + 4])),
                         spends=((1.0 + k / 100, 0.02, 10),))
        store.save(record)
        records.append(record)
    ledger = DataLedger(store, _record(run="now", client="9", spends=()), np.unique(digests))
    assert ledger.conservative and len(ledger.prior_histories()) == 1
    everything = sorted(s.as_entry() for r in records for s in r.spends)
    assert sorted(ledger.prior_histories()[0]) == everything


def test_the_dominating_history_bounds_every_rows_and_stays_close():
    """One run split rows over three clients: every row was in one record, so one mechanism
    per purpose (smallest σ, largest q, most steps) bounds each; a run whose records share
    a row is charged with all of them."""
    from privet.common.privacy import accountants
    from privet.common.privacy.ledger import dominating_history

    rows = np.arange(30, dtype=np.uint64)
    sets = [rows[:10], rows[10:20], rows[20:]]
    spends = [((1.1, 0.02, 300),), ((0.9, 0.05, 100),), ((1.0, 0.03, 200),)]
    records = [_record(run="r", client=str(i), spends=sp) for i, sp in enumerate(spends)]
    truths = [pld_epsilon(list(sp), DELTA) for sp in spends]
    union = pld_epsilon([e for sp in spends for e in sp], DELTA)
    alike = [((1.0, 0.03, 200),), ((1.02, 0.03, 190),), ((1.01, 0.029, 200),)]
    records_alike = [_record(run="s", client=str(i), spends=sp) for i, sp in enumerate(alike)]
    bound = dominating_history(records_alike, sets, rows)
    assert history_of(bound) == ((1.0, 0.03, 200),)  # clients alike: one mechanism, tight
    assert accountants.epsilon(history_of(bound), DELTA, "pld") >= max(
        pld_epsilon(list(sp), DELTA) for sp in alike)
    bound = dominating_history(records, sets, rows)  # clients unlike: the tighter of the two
    eps = accountants.epsilon(history_of(bound), DELTA, "pld")
    assert all(eps >= t for t in truths) and eps <= union * 1.01
    shared = [rows[:15], rows[10:20], rows[20:]]  # rows 10..14 were in two records
    assert sorted(history_of(dominating_history(records, shared, rows))) == sorted(
        e for sp in spends for e in sp)


def test_a_ledger_moved_or_stripped_of_records_is_noticed(tmp_path, store):
    record = _record(rows=store.save_rows(row_digests([["a"], ["b"]])))
    store.save(record)
    moved = tmp_path / "moved"
    shutil.move(str(tmp_path / "data"), str(moved))
    (moved / ".privet-ledger" / "spend" / record.file_name).unlink()
    with pytest.raises(LedgerError, match="missing, while its copy records spend"):
        LedgerDir(moved).records()  # its id file leads to the same copy
    shutil.rmtree(store.copy)  # and with no copy at all, the rows nobody names remain
    with pytest.raises(LedgerError, match="rows that no privacy ledger record names"):
        LedgerDir(moved).records()
    LedgerDir(moved).forget_orphans()  # the explicit way out
    assert LedgerDir(moved).records() == []


def test_a_record_pointed_at_other_rows_is_noticed(store):
    record = _record(rows=store.save_rows(row_digests([["a"], ["b"], ["c"]])))
    store.save(record)
    other = store.save_rows(row_digests([["z"]]))
    tampered = record.to_dict()
    tampered["rows"] = other
    (store.root / "spend" / record.file_name).write_text(json.dumps(tampered))
    with pytest.raises(LedgerError, match="other rows than its copy"):
        store.records()


def test_a_missing_row_set_is_one_line(store):
    record = _record(rows=store.save_rows(row_digests([["a"], ["b"]])))
    store.save(record)
    (store.root / "rows" / f"{record.rows}.u64").unlink()
    with pytest.raises(LedgerError, match="the rows a privacy ledger record names are missing"):
        LedgerDir(store.root.parent).records()


def test_the_listing_composes_records_of_every_source_that_touched_a_row(store):
    """A row appended to another file keeps the spend recorded under the first file's name."""
    from privet.common.privacy.ledger_report import spend_by_source

    digests = row_digests([["row", i] for i in range(20)])
    a, b = (1.0, 0.02, 200), (0.8, 0.05, 50)
    first = SpendRecord("r1-client0", "r1", "0", "a.csv", store.save_rows(np.unique(digests)),
                        "seeded", [Spend(*a)])
    second = SpendRecord("r2-client0", "r2", "0", "b.csv",
                         store.save_rows(np.unique(digests[:5])), "seeded", [Spend(*b)])
    store.save(first)
    store.save(second)
    listed = {s.source: s for s in spend_by_source(store.root.parent)}
    both = pld_epsilon([a, b], DELTA)
    assert listed["a.csv"].epsilon == pytest.approx(both, rel=0.01)
    assert listed["a.csv"].rows_at_max == 5 and listed["b.csv"].rows == 5
    assert listed["b.csv"].epsilon == pytest.approx(both, rel=0.01)


# --- end to end: every run on the same rows composes ------------------------------------

def _simulate(out, ledgers, *settings, config=TINY, expect=0):
    args = ["simulate", "--config", str(config), "--out", str(out),
            "--set", f"privacy.ledger-dir={json.dumps(str(ledgers))}"]
    for setting in settings:
        args += ["--set", setting]
    proc = privet(*args)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == expect, stdout[-3000:]
    return (json.loads((out / "summary.json").read_text()) if expect == 0 else None), stdout


def _run_spend(summary):
    return {int(c): [tuple(s[:3]) for s in v.get("this_run", [])]
            for c, v in summary["privacy"]["clients"].items()}


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_reruns_with_another_config_or_seed_compose_on_the_same_rows(tmp_path):
    """Run 1 spends ε = 1 per client. Run 2 asks rounds = 3 and a new name: before, a new
    experiment id gave every client a fresh budget; now each row's spend composes, so with
    the same target every client declines to spend anything (even the preprocessing
    statistics) and the run ends before round 1. Run 3 re-seeds the split (rows move between
    clients) and raises the target to 2: each client calibrates for what its most spent
    rows have left. The true ε of every row is recomputed here from the two splits and the
    spend each client reported, with dp-accounting."""
    ledgers = tmp_path / "ledgers"
    one, _ = _simulate(tmp_path / "r1", ledgers, "privacy.epsilon=1")
    two, _ = _simulate(tmp_path / "r2", ledgers, "privacy.epsilon=1", "rounds=3",
                       "name=renamed")
    assert two["status"] == "budget-exhausted" and two["rounds"] == 0
    for client, entry in two["privacy"]["clients"].items():
        assert entry["rounds_trained"] == 0 and entry["this_run"] == []
        assert entry["epsilon"] <= 1.0
        assert entry["epsilon"] == pytest.approx(
            pld_epsilon([tuple(s[:3]) for s in one["privacy"]["clients"][client]["this_run"]],
                        DELTA), rel=0.01)
    three, _ = _simulate(tmp_path / "r3", ledgers, "privacy.epsilon=2", "seed=8")
    cfg1, cfg3 = load_config(TINY, ["privacy.epsilon=1"]), load_config(TINY, ["seed=8"])
    owner1 = np.full(len(adult.load_raw("train")), -1)
    for client, part in enumerate(partitions(cfg1)):
        owner1[part] = client
    spent1, spent3 = _run_spend(one), _run_spend(three)
    for client, part in enumerate(partitions(cfg3)):
        overlapping = sorted(set(owner1[part].tolist()))
        true = max(pld_epsilon(spent1.get(c, []) + spent3[client], DELTA) for c in overlapping)
        reported = three["privacy"]["clients"][str(client)]["epsilon"]
        assert reported == pytest.approx(true, rel=0.01), (client, overlapping)
        assert reported <= 2.0
        assert three["privacy"]["clients"][str(client)]["rounds_trained"] >= 1
    listed = _ledger_json(ledgers)["sample_level"]
    assert len(listed) == 1 and len(listed[0]["runs"]) == 2  # run 2 spent nothing
    assert listed[0]["max_epsilon"] == pytest.approx(
        max(c["epsilon"] for c in three["privacy"]["clients"].values()), rel=1e-6)


def _ledger_json(ledgers):
    from privet.experiments.cli import app

    result = CliRunner().invoke(app, ["ledger", str(ledgers), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_appending_rows_keeps_the_spend_of_the_old_ones(tmp_path):
    data, test = tmp_path / "data.csv", tmp_path / "test.csv"
    _write_adult(data, 0, 3000)
    _write_adult(test, 30000, 31000)
    common = ["data.dataset=csv", f"data.path={json.dumps(str(data))}", "data.label=income",
              f"data.test-path={json.dumps(str(test))}", BOUNDS, "data.partition=iid"]
    ledgers = tmp_path / "ledgers"
    one, _ = _simulate(tmp_path / "r1", ledgers, *common, "privacy.epsilon=1")
    cfg1 = load_config(TINY, [*common, "privacy.epsilon=1"])
    old_parts = partitions(cfg1)
    _write_adult(data, 0, 3600)  # 600 rows appended
    from privet.common.data import datasets

    datasets.tabular_source.cache_clear()
    datasets._partitions.cache_clear()
    two, _ = _simulate(tmp_path / "r2", ledgers, *common, "privacy.epsilon=2")
    cfg2 = load_config(TINY, [*common, "privacy.epsilon=2"])
    owner1 = np.full(3600, -1)
    for client, part in enumerate(old_parts):
        owner1[part] = client
    spent1, spent2 = _run_spend(one), _run_spend(two)
    for client, part in enumerate(partitions(cfg2)):
        holders = sorted(set(owner1[part].tolist()))
        true = max(pld_epsilon(spent1.get(c, []) + spent2[client], DELTA) for c in holders)
        reported = two["privacy"]["clients"][str(client)]["epsilon"]
        assert -1 in holders and len(holders) > 1  # old rows and new rows in each client
        assert reported == pytest.approx(true, rel=0.01) and reported <= 2.0


def test_a_client_that_gets_another_id_keeps_its_rows_spend(tmp_path):
    """One file per client: renaming a file changes which client id reads it."""
    folder = tmp_path / "clients"
    folder.mkdir()
    for i, name in enumerate(["a.csv", "b.csv", "c.csv"]):
        _write_adult(folder / name, i * 1500, (i + 1) * 1500)
    test = tmp_path / "test.csv"
    _write_adult(test, 30000, 31000)
    common = ["data.dataset=csv", f"data.path={json.dumps(str(folder))}",
              "data.label=income", f"data.test-path={json.dumps(str(test))}", BOUNDS]
    ledgers = tmp_path / "ledgers"
    one, _ = _simulate(tmp_path / "r1", ledgers, *common, "privacy.epsilon=1")
    (folder / "a.csv").rename(folder / "d.csv")  # sorted: b, c, d -> clients 0, 1, 2
    two, _ = _simulate(tmp_path / "r2", ledgers, *common, "privacy.epsilon=1")
    moved = {0: 1, 1: 2, 2: 0}  # new client -> the old client whose file it now reads
    for new, old in moved.items():
        entry = two["privacy"]["clients"][str(new)]
        assert entry["rounds_trained"] == 0, entry  # its rows' budget was spent in run 1
        assert entry["earlier_runs_epsilon"] == pytest.approx(
            pld_epsilon(_run_spend(one)[old], DELTA), rel=0.01)


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_a_damaged_ledger_stops_the_run_in_one_line(tmp_path):
    ledgers = tmp_path / "ledgers"
    _simulate(tmp_path / "r1", ledgers)
    record = sorted((ledgers / ".privet-ledger" / "spend").glob("*client0.json"))[0]
    record.write_text("{}")
    _, stdout = _simulate(tmp_path / "r2", ledgers, expect=2)
    errors = [line for line in stdout.splitlines() if "privet: error" in line]
    assert len(errors) == 1 and str(record) in errors[0], stdout[-2000:]
    record.unlink()  # deleted: its copy says it existed
    _, stdout = _simulate(tmp_path / "r3", ledgers, expect=2)
    assert "missing, while its copy records spend" in stdout


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_the_user_level_ledger_persists_over_runs(tmp_path):
    """Run 1 spends the participants' user-level budget (ε = 1); run 2 with the same target
    has nothing left and stops before round 1; run 3 with target 2 calibrates for what is
    left, and its ε is the composition of both runs (dp-accounting, directly)."""
    ledgers = tmp_path / "ledgers"
    user = ["privacy.level=user", "preprocess.fit=local", "num-clients=4",
            "clients-per-round=2"]
    one, _ = _simulate(tmp_path / "r1", ledgers, *user, "privacy.user-epsilon=1")
    first = one["privacy"]["user_level"]
    assert first["epsilon"] <= 1.0 and first["earlier_runs_epsilon"] == 0.0
    two, _ = _simulate(tmp_path / "r2", ledgers, *user, "privacy.user-epsilon=1")
    assert two["status"] == "budget-exhausted" and two["rounds"] == 0
    three, _ = _simulate(tmp_path / "r3", ledgers, *user, "privacy.user-epsilon=2")
    third = three["privacy"]["user_level"]
    both = [tuple(s[:3]) for s in first["this_run"] + third["this_run"]]
    assert third["epsilon"] == pytest.approx(pld_epsilon(both, DELTA), rel=0.01)
    assert 1.0 < third["epsilon"] <= 2.0 and three["rounds"] == 2
    assert third["earlier_runs_epsilon"] == pytest.approx(first["epsilon"], rel=1e-6)


def test_without_a_ledger_dir_the_ledger_lives_and_dies_with_its_run(tmp_path):
    one, _ = _simulate(tmp_path / "r1", "")
    two, _ = _simulate(tmp_path / "r2", "")
    for client in one["privacy"]["clients"]:
        assert two["privacy"]["clients"][client]["rounds_trained"] == 2
        assert two["privacy"]["clients"][client]["ledger"]["location"] == \
            f"{tmp_path / 'r2' / 'ledgers' / f'client-{client}.json'} (this run only)"
    assert not list(tmp_path.glob("**/.privet-ledger"))
    statuses = {r["status"] for r in rows(tmp_path / "r2" / "metrics.csv")}
    assert statuses == {"trained"}
