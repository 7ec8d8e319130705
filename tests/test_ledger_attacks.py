"""A ledger holds against a server that asks too much, runs that race, and edits by hand."""

import json
import multiprocessing
import sys

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from independent import pld_epsilon
from test_ledger import _record, _write_adult
from test_user_dp import task_identity  # noqa: F401 - a fixture

from privet.clients import accounting as A
from privet.clients import app as client_app
from privet.common import records as R
from privet.common.config import CONFIGS_DIR, load_config
from privet.common.privacy.ledger import (
    ALL_ROWS,
    DataLedger,
    LedgerDir,
    LedgerError,
    Spend,
    SpendRecord,
    history_of,
    record_file_name,
    row_digests,
)

DELTA = 1e-5
ROWS = row_digests([i] for i in range(100))


def _ledger(store, run, columns=()):
    current = SpendRecord(f"{run}-client0", run, "0", "test", ALL_ROWS, "seeded",
                          columns=columns)
    return DataLedger(store, current, ROWS)


def _spend_until_refused(directory, run, results):
    store = LedgerDir(directory)
    ledger = _ledger(store, run)
    granted = 0
    while ledger.reserve([Spend(3.0, 0.1, 5, "dp-sgd")], 2.0, DELTA, "pld") is not None:
        granted += 1
    results.put(granted)


def test_runs_racing_on_one_ledger_never_pass_the_target_together(tmp_path):
    """Two processes reserve spend on the same rows at once; each check and its record are
    one step under the folder's lock, so what both recorded stays within the target
    (dp-accounting over every record, independently)."""
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=_spend_until_refused,
                               args=(tmp_path / "data", f"run{i}", results)) for i in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=300)
        assert w.exitcode == 0
    granted = [results.get(timeout=5) for _ in workers]
    assert sum(granted) > 2 and all(granted)  # both got some: they really raced
    spends = [s for r in LedgerDir(tmp_path / "data").records() for s in r.spends]
    assert sum(s.steps for s in spends) == 5 * sum(granted)
    total = pld_epsilon(list(history_of(spends)), DELTA)
    assert total <= 2.0 * 1.005
    more = pld_epsilon(list(history_of(spends + [Spend(3.0, 0.1, 5)])), DELTA)
    assert more > 2.0  # the last refusal was needed


def test_ids_that_look_alike_never_share_a_file(tmp_path):
    names = {record_file_name(i) for i in ("a/1", "a_1", "a:1", "a 1", ".a_1", "a_1")}
    assert len(names) == 5 and all("/" not in n for n in names)
    store = LedgerDir(tmp_path / "data")
    first = _record(run="a_1")
    store.save(first)
    clash = SpendRecord(first.id + "x", "x", "0", "test", ALL_ROWS, "seeded", [Spend(1, 1, 1)])
    (store.root / "spend" / record_file_name(clash.id)).write_text(
        (store.root / "spend" / first.file_name).read_text())
    with pytest.raises(LedgerError, match="refusing to overwrite another run's spend"):
        store.save(clash)


@pytest.mark.parametrize("edit", ["", "0123456789abcdef01234567\n"])
def test_an_emptied_or_rewritten_ledger_id_is_noticed_through_the_copy(tmp_path, edit):
    store = LedgerDir(tmp_path / "data")
    store.save(_record())
    for folder in ("spend", "rows"):
        for path in (store.root / folder).glob("*"):
            path.unlink()
    (store.root / "id").write_text(edit)
    with pytest.raises(LedgerError) as error:
        LedgerDir(tmp_path / "data").records()
    assert str(store.root) in str(error.value)


def test_a_run_that_reads_other_columns_of_the_same_source_is_refused(tmp_path):
    store = LedgerDir(tmp_path / "data")
    first = _ledger(store, "r1", columns=("age", "income", "label"))
    first.record(Spend(1.0, 0.1, 10))
    _ledger(store, "r2", columns=("age", "income", "label"))  # same columns: fine
    with pytest.raises(LedgerError, match=r"no longer \['income'\]"):
        _ledger(store, "r3", columns=("age", "label"))


def _statistics_message(run, stage="statistics"):
    return Message(RecordDict({"config": ConfigRecord({
        R.STAGE: stage, "server-round": 0, R.RUN: run})}), dst_node_id=1,
        message_type="query")


def test_a_server_asking_twice_for_the_same_statistics_is_refused(tmp_path, task_identity):
    data = tmp_path / "node" / "data.csv"
    data.parent.mkdir()
    _write_adult(data, 0, 600)
    cfg = load_config(CONFIGS_DIR / "adult.toml", ["num-clients=1", "clients-per-round=1"])
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0,
                                                        "data-path": str(data)},
                      state=RecordDict(), run_config=cfg.to_run_config())
    first = client_app.statistics(_statistics_message("run1", "bounds"), context)
    assert "statistics" in first.content
    again = client_app.statistics(_statistics_message("run1", "bounds"), context)
    assert "statistics" not in again.content and again.content["metrics"][R.FAILED] == 1
    assert "a second time" in str(again.content[R.FAILURE]["reason"])
    odd = client_app.statistics(_statistics_message("../../x"), context)
    assert "run id" in str(odd.content[R.FAILURE]["reason"])
    spent = json.loads(str(first.content[R.PRIVACY][R.LEDGER]))
    records = LedgerDir(data.parent).records()
    assert [len(r.spends) for r in records] == [1] and spent["epsilon"] > 0


def test_a_supernode_numbering_its_partitions_is_a_deployment(monkeypatch):
    """`flower-supernode --node-config "partition-id=0 num-partitions=3"`: the ClientApp runs
    through Flower's run_clientapp, so it refuses seeded noise like any deployed node."""
    from privet.common.privacy.randomness import NoiseSourceError

    cfg = load_config(CONFIGS_DIR / "tiny.toml", ['privacy.noise-source="seeded"'])
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 0,
                                                        "num-partitions": 3},
                      state=RecordDict(), run_config=cfg.to_run_config())
    assert not A.deployed(context)  # the simulation engine numbers its nodes this way
    monkeypatch.setitem(sys.modules, A.RUN_CLIENTAPP, type(sys)("run_clientapp"))
    assert A.deployed(context)
    with pytest.raises(NoiseSourceError):
        A.noise_source(cfg, context)


class InProcessGrid:
    """Flower's Grid as the server's preprocessing uses it, delivering each message to the
    real ClientApp handler of its node (only the transport is left out)."""

    def __init__(self, contexts):
        self.contexts = contexts

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None):
        return [client_app.statistics(m, self.contexts[m.metadata.dst_node_id])
                for m in messages]


def test_every_client_failing_its_statistics_fails_the_run_naming_one(tmp_path,
                                                                      task_identity):
    from privet.server.preprocessing import fit_shared_transform
    from privet.server.strategy import NoClientsLeft

    cfg = load_config(CONFIGS_DIR / "adult.toml", ["num-clients=2", "clients-per-round=2"])
    failures = []
    contexts = {n + 1: Context(run_id=1, node_id=n + 1, node_config={
        "partition-id": n, "data-path": str(tmp_path / f"gone{n}.csv")}, state=RecordDict(),
        run_config=cfg.to_run_config()) for n in range(2)}

    def on_spend(client, msg):
        failures.append((client, int(msg.content["metrics"].get(R.FAILED, 0))))

    with pytest.raises(NoClientsLeft, match=r"every client failed .* client 0: .*gone0\.csv"):
        fit_shared_transform(InProcessGrid(contexts), cfg, "run1", on_spend)
    assert sorted(failures) == [("0", 1), ("1", 1)]


_OPEN_LEDGER = """
import sys
import numpy as np
from privet.common.privacy.ledger import ALL_ROWS, DataLedger, LedgerDir, SpendRecord
store = LedgerDir(sys.argv[1], copy_root=__import__("pathlib").Path(sys.argv[2]))
DataLedger(store, SpendRecord("reader", "reader", "1", "test", ALL_ROWS, "seeded"),
           np.arange(5, dtype=np.uint64))
print("opened")
"""


def test_a_reader_never_sees_a_row_set_whose_record_is_being_written(tmp_path):
    """A client records its spend as a row set, then the record that names it. Another
    process that opened the ledger between the two saw an orphaned row set and refused the
    ledger (seen in CI with three clients sharing one folder). Both writes and every read
    now happen under the folder's lock: the reader waits, then opens it."""
    import subprocess
    import time

    import numpy as np

    store = LedgerDir(tmp_path / "ledgers", copy_root=tmp_path / "copies")
    writer = DataLedger(store, SpendRecord("writer", "writer", "0", "test", ALL_ROWS,
                                           "seeded"), np.arange(10, dtype=np.uint64))
    with store.locked():
        writer.current.rows = store.save_rows(writer.digests)  # the row set, no record yet
        reader = subprocess.Popen([sys.executable, "-c", _OPEN_LEDGER, str(tmp_path / "ledgers"),
                                   str(tmp_path / "copies")], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)  # room for the reader to get there (it must wait, however long)
        assert reader.poll() is None, reader.communicate()
        writer.record(Spend(1.0, 0.1, 10))  # the record naming the row set, same lock
    out, err = reader.communicate(timeout=120)
    assert reader.returncode == 0 and out.strip() == "opened", err[-2000:]
