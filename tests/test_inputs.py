"""Nothing silent: every bad input, failure and signal leaves one clear line, true results,
nothing lost (shared/cases/inputs: each case is one instance of the kind tested here)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROJECT_DIR
from test_simulation import privet, rows
from test_strategy import ConnectedNodes
from test_user_dp import task_identity  # noqa: F401 (a fixture)

from privet.common.config import CONFIGS_DIR, ConfigError, load_config
from privet.common.data import adult, tables
from privet.common.data.numbers import NumberFormat, infer_format
from privet.common.data.preprocess import clean

TINY = CONFIGS_DIR / "tiny.toml"
FAST = ["rounds=2", "num-clients=2", "clients-per-round=2"]


def simulate(out, *settings, config=TINY, timeout=600):
    args = ["simulate", "--config", str(config), "--out", str(out)]
    for setting in settings:
        args += ["--set", setting]
    proc = privet(*args)
    stdout, _ = proc.communicate(timeout=timeout)
    return proc.returncode, stdout


def one_error_line(stdout: str) -> str:
    errors = [line for line in stdout.splitlines() if "privet: error" in line]
    assert len(errors) == 1, stdout[-3000:]
    assert "Traceback" not in stdout, stdout[-3000:]
    return errors[0]


def adult_csv(path: Path, start: int, stop: int, change=None) -> Path:
    frame = adult.load_raw("train").iloc[start:stop].copy()
    if change:
        change(frame)
    frame.to_csv(path, index=False, header=adult.COLUMNS)
    return path


CSV = ["data.dataset=csv", "data.label=income", "data.partition=iid"]


def schema_of(*paths: Path, label: str, markers=()) -> tables.TableSchema:
    """What privet infers from these files, with nothing declared."""
    found = [tables.read_table(p, label=label) for p in paths]
    return tables.infer_schema(found, label=label, column_types={}, categories={},
                               classes=[], missing_markers=list(markers))


# --- 1. non-finite numbers ---------------------------------------------------------------

def test_non_finite_cells_are_missing_values_counted_and_shown(tmp_path):
    def poison(frame):
        frame.iloc[3, 0], frame.iloc[7, 0], frame.iloc[9, 0] = "inf", "-inf", "1e309"
        frame.iloc[11, 0] = "nan"
    data = adult_csv(tmp_path / "data.csv", 0, 1500, poison)
    test = adult_csv(tmp_path / "test.csv", 30000, 31000)  # every poisoned row trains
    code, stdout = simulate(tmp_path / "run", *FAST, *CSV, f"data.path={json.dumps(str(data))}",
                            f"data.test-path={json.dumps(str(test))}")
    assert code == 0, stdout[-3000:]
    said = " ".join(stdout.split())
    assert "column 'age': 4 non-finite value(s), e.g. line 5: 'inf'" in said
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sum(d["non_finite_numbers"] for d in summary["data"].values()) == 4
    assert np.isfinite(summary["loss"]) and summary["status"] == "complete"
    trained = [r for r in rows(tmp_path / "run" / "metrics.csv") if r["status"] == "trained"]
    assert all(np.isfinite(float(r["loss"])) for r in trained)


def test_clean_reads_non_finite_numbers_as_missing():
    frame = pd.DataFrame({"x": ["1", "inf", "-inf", "1e309", "nan", "2"], "y": ["a"] * 6})
    cleaned, report = clean(frame, numeric=["x"], label="y", missing_markers=[],
                            drop_duplicates=False)
    assert cleaned["x"].isna().tolist() == [False, True, True, True, True, False]
    assert report.non_finite_numbers == 4 and report.unparseable_numbers == 0


def test_a_diverging_model_stops_the_run_as_failed_in_one_line(tmp_path):
    """Every client's update turns non-finite (lr = 1e30): the server rejects them, names the
    clients, and a run with no client left to train ends `failed`, not `complete`."""
    code, stdout = simulate(tmp_path / "run", *FAST, "privacy.level=none", "train.lr=1e30")
    assert code == 1, stdout[-3000:]
    line = one_error_line(stdout)
    assert "fewer than min-clients" in line or "not finite" in line
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    failed = summary["failures"]["clients"]
    assert failed and all("non-finite update" in f["reason"] for f in failed.values())
    model = torch.load(tmp_path / "run" / "model.pt")["state_dict"]  # the last finite one
    assert all(torch.isfinite(v).all() for v in model.values())


# --- 2. how numbers are written ------------------------------------------------------------

def test_decimal_commas_and_thousands_separators_are_numbers(tmp_path):
    semicolon = tmp_path / "semi.csv"
    semicolon.write_text("age;hours;colour;outcome\n" + "".join(
        f"{20 + i % 50};{10 + i % 30},{i % 1000:03d};{'red' if i % 2 else 'blue'};"
        f"{'yes' if i % 3 else 'no'}\n" for i in range(200)))
    table = tables.read_table(semicolon, label="outcome")
    schema = schema_of(semicolon, label="outcome", markers=["?"])
    assert schema.numeric == ("age", "hours") and schema.formats["hours"] == NumberFormat(",")
    cleaned, report = clean(table.frame, numeric=list(schema.numeric), label="outcome",
                            missing_markers=["?"], formats=schema.formats)
    assert cleaned["hours"].iloc[1] == pytest.approx(11.001)
    assert report.unparseable_numbers == 0
    comma = tmp_path / "thousands.csv"
    comma.write_text("age,score,label\n" + "".join(
        f'{30 + i % 40},"{i * 1013 % 900 + 1},{i % 1000:03d}.5",{"no" if i % 2 else "yes"}\n'
        for i in range(200)))
    table = tables.read_table(comma, label="label")
    schema = schema_of(comma, label="label")
    assert schema.formats["score"] == NumberFormat(".", ",")
    cleaned, _ = clean(table.frame, numeric=list(schema.numeric), label="label",
                       missing_markers=[], formats=schema.formats)
    assert cleaned["score"].iloc[1] == pytest.approx(114001.5)  # "114,001.5"


def test_ambiguous_numbers_follow_the_separator_or_a_declaration():
    counts = pd.Series(["25,165", "14,505", "24,469"]).value_counts(sort=False)
    assert infer_format(counts, ";", 0.95)[0] == NumberFormat(",")       # European export
    assert infer_format(counts, ",", 0.95)[0] == NumberFormat(".", ",")  # quoted thousands
    declared = NumberFormat(",", ".")
    assert infer_format(counts, ",", 0.95, declared) == (declared, 1.0)


def test_a_column_that_falls_back_to_categories_is_reported_before_the_run(tmp_path):
    path = tmp_path / "mixed.csv"
    path.write_text("weight,when,label\n" + "".join(
        f"{'unknown' if i % 5 == 0 else 60 + i % 30},2024-01-{1 + i % 28:02d} 10:{i % 60:02d},"
        f"{'a' if i % 2 else 'b'}\n" for i in range(300)))
    notes = " ".join(schema_of(path, label="label").fallbacks)
    assert "column 'weight' treated as categorical" in notes and "80% of its cells" in notes
    assert "'unknown'" in notes and "data.column-types = { weight = \"numeric\" }" in notes
    assert "column 'when' looks like dates or times" in notes


# --- 3. labels -----------------------------------------------------------------------------

def test_labels_are_normalised_once_for_classes_and_encoding(tmp_path):
    folder = tmp_path / "clients"
    folder.mkdir()
    (folder / "a.csv").write_text("x,label\n" + "".join(f"{i},{i % 2}\n" for i in range(100)))
    (folder / "b.csv").write_text("x,label\n" + "".join(f"{i},{i % 2}.0\n" for i in range(100)))
    found = tables.read_folder(folder, label="label")
    schema = tables.infer_schema(found, label="label", column_types={}, categories={},
                                 classes=[], missing_markers=[])
    assert schema.classes == ("0", "1")
    assert any("the same class written differently" in n for n in schema.fallbacks)
    dotted = tmp_path / "dots.csv"
    dotted.write_text("x,label\n" + "".join(f"{i},{'yes.' if i % 2 else 'no'}\n"
                                            for i in range(50)))
    assert schema_of(dotted, label="label").classes == ("no", "yes")
    cased = tmp_path / "cased.csv"
    cased.write_text("x,label\n" + "".join(f"{i},{['Yes', 'yes', 'no'][i % 3]}\n"
                                           for i in range(60)))
    notes = schema_of(cased, label="label").fallbacks
    assert any("differ only by case or spacing: 'Yes', 'yes'" in n for n in notes)


# --- 4. a failing client is named, not hidden ----------------------------------------------

def test_a_failing_client_is_named_left_out_and_the_run_says_so(tmp_path):
    folder = tmp_path / "sites"
    folder.mkdir()
    for i in range(2):
        adult_csv(folder / f"site{i}.csv", i * 1000, (i + 1) * 1000)
    adult_csv(folder / "site2.csv", 3000, 3200,
              lambda f: f.__setitem__(adult.LABEL, ""))  # no labels: no rows left
    test = adult_csv(tmp_path / "test.csv", 30000, 31000)
    code, stdout = simulate(tmp_path / "run", "rounds=3", "num-clients=3",
                            "clients-per-round=3", "data.dataset=csv", "data.label=income",
                            f"data.path={json.dumps(str(folder))}",
                            f"data.test-path={json.dumps(str(test))}")
    assert code == 3, stdout[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "complete-with-failures"
    assert summary["failures"]["count"] == 1
    failure = summary["failures"]["clients"]["2"]
    assert "no rows left after cleaning" in failure["reason"]
    assert "'missing_label_dropped': 200" in failure["reason"]
    assert (failure["stage"], failure["round"]) == ("preprocessing", 0)
    per_client = [(r["round"], r["client"], r["status"].split(":")[0])
                  for r in rows(tmp_path / "run" / "metrics.csv")]
    assert not [r for r in per_client if r[1] == "2"]  # never sampled to train
    assert {r[1] for r in per_client} == {"0", "1"}
    said = " ".join(stdout.split())
    assert "client 2 failed in preprocessing (before round 1) and was left out" in said
    assert "the run finished with failures: 1 of 3 clients failed" in said
    assert "Traceback" not in stdout


def test_most_clients_too_small_is_said_before_the_run(tmp_path):
    from privet.experiments.simulation import preflight

    cfg = load_config(TINY, ["num-clients=400", "clients-per-round=10", "data.min-rows=1",
                             "data.partition=quantity", "data.power=1.5"])
    _, notes = preflight(cfg)
    assert any("of 400 clients have fewer rows than train.batch-size = 128 and will never "
               "train" in n for n in notes), notes


# --- 5. integer arithmetic ------------------------------------------------------------------

def test_the_expected_batch_is_whole_rows_per_step_never_zero():
    import math

    from privet.clients.train import expected_batch_size, sample_rate

    assert expected_batch_size(49, 1) == 1  # int(49 * (1/49)) is 0 in floating point
    for n in range(1, 600):
        for batch in (1, 2, 3, 7, 64, 128):
            k = math.ceil(n / batch)
            assert expected_batch_size(n, batch) == n // k >= 1
            assert sample_rate(n, batch) == 1 / k


# --- 6. the output directory is the user's -------------------------------------------------

def test_a_folder_of_the_users_is_never_written_into(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.toml").write_text("# my notes\n")
    (mine / "model.pt").write_text("precious")
    code, stdout = simulate(mine, *FAST)
    assert code == 2 and "not empty and not a privet run" in one_error_line(stdout)
    assert (mine / "config.toml").read_text() == "# my notes\n"
    assert sorted(p.name for p in mine.iterdir()) == ["config.toml", "model.pt"]
    proc = privet("simulate", "--config", str(TINY), "--out", str(mine), "--overwrite")
    proc.communicate(timeout=300)
    assert proc.returncode == 2 and (mine / "model.pt").read_text() == "precious"


def test_a_run_of_an_older_privet_is_a_privet_run(tmp_path):
    """Run folders written before the marker existed are recognised by their summary."""
    from privet.common.run_dir import RunDirError, claim

    old = tmp_path / "old"
    old.mkdir()
    (old / "summary.json").write_text(json.dumps({"status": "complete", "privacy": {},
                                                  "versions": {}}))
    with pytest.raises(RunDirError, match="already holds a run"):
        claim(old, finished="summary.json")
    assert claim(old, finished="summary.json", stale=("summary.json",), overwrite=True) == old
    assert not (old / "summary.json").exists() and (old / ".privet-run").is_file()


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_an_out_that_is_a_file_is_one_line_before_any_data_is_read(tmp_path, where):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    code, stdout = simulate(out, *FAST, "data.dataset=csv", "data.label=y",
                            "data.path=\"/nonexistent.csv\"")
    line = one_error_line(stdout)
    assert code == 2 and f"--out {out}" in line and "not a directory" in line


def test_a_second_run_into_the_same_out_is_refused_at_once(tmp_path):
    out = tmp_path / "run"
    first = privet("simulate", "--config", str(TINY), "--out", str(out), "--set", "rounds=30")
    deadline = time.time() + 120
    while not (out / ".privet-lock").exists() and time.time() < deadline:
        time.sleep(0.2)
    code, stdout = simulate(out, "privacy.epsilon=8")
    assert code == 2 and "in use by another privet run" in one_error_line(stdout)
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=300)
    assert load_config(out / "config.toml").privacy.epsilon == 2.0  # only the first's files


# --- 7. signals ---------------------------------------------------------------------------

def _session_processes(sid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _wait_for_round(out: Path, rounds: int = 1) -> None:
    deadline = time.time() + 240
    while time.time() < deadline:
        if (out / "rounds.csv").exists() and len(rows(out / "rounds.csv")) >= rounds:
            return
        time.sleep(0.2)
    pytest.fail("no round finished")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_terminate_or_kill_leaves_no_process_and_terminate_marks_the_run(tmp_path, sig):
    out = tmp_path / "run"
    proc = privet("simulate", "--config", str(TINY), "--out", str(out), "--set", "rounds=200")
    _wait_for_round(out)
    sid = os.getsid(proc.pid)
    proc.send_signal(sig)
    stdout, _ = proc.communicate(timeout=120)
    if sig == signal.SIGTERM:
        assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:]
        assert "interrupted (SIGTERM); finished rounds are kept" in stdout
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "interrupted"
        # the summary is the last round written, never fewer rounds or less ε than the
        # files (and the model) hold
        last = rows(out / "rounds.csv")[-1]
        assert summary["rounds"] == int(last["round"])
        assert summary["privacy"]["max_epsilon"] == pytest.approx(float(last["max_epsilon"]),
                                                                  rel=1e-5)
        assert torch.load(out / "model.pt", weights_only=True)["round"] == summary["rounds"]
    deadline = time.time() + 20  # workers notice their parent is gone within seconds
    while _session_processes(sid) and time.time() < deadline:
        time.sleep(0.5)
    assert not _session_processes(sid), subprocess.run(
        ["ps", "-o", "pid,ppid,args", "-s", str(sid)], capture_output=True, text=True).stdout
    assert len(rows(out / "rounds.csv")) >= 1  # finished rounds stay readable


# --- 8./9. text verbatim, config and file errors in one line ---------------------------------

@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_text_from_data_and_config_is_shown_verbatim(tmp_path):
    data = tmp_path / "markup.csv"
    data.write_text("score,weight [kg],outcome\n" + "".join(
        f"{'[/quote]' if i == 5 else i},{i % 7},{'a' if i % 2 else 'b'}\n" for i in range(400)))
    code, stdout = simulate(tmp_path / "run", *FAST, "data.dataset=csv",
                            "data.label=outcome [y/n]", f"data.path={json.dumps(str(data))}")
    assert code == 2 and "weight [kg], outcome" in one_error_line(stdout)
    code, stdout = simulate(tmp_path / "run2", *FAST, "data.dataset=csv", "data.label=outcome",
                            f"data.path={json.dumps(str(data))}")
    assert code == 0, stdout[-3000:]
    said = " ".join(stdout.split())
    assert "e.g. line 7: '[/quote]'; treated as missing" in said
    assert said.count("non-numeric value(s)") == 1  # said once
    assert "\x1b[" not in stdout  # no colour codes into a pipe


@pytest.mark.parametrize("content, expected", [
    (b"name = \"caf\xe9\"\n", "line 1: not UTF-8 text (byte 0xe9)"),
    (None, "a folder, not a config file (--config)"),
])
def test_config_files_that_cannot_be_read_are_one_line(tmp_path, content, expected):
    path = tmp_path / "config.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match="^" + str(path).replace("\\", "\\\\")) as error:
        load_config(path)
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_a_byte_order_mark_is_fine_and_overrides_are_named(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbfname = \"bom\"\n")
    assert load_config(path).name == "bom"
    with pytest.raises(ConfigError, match=r"^--set seed=99999999999999999999: seed = "
                                          r"99999999999999999999: expected a value < 2\*\*63"):
        load_config(path, ["seed=99999999999999999999"])
    with pytest.raises(ConfigError, match=r"^--set privacy.delta=2: "):
        load_config(path, ["rounds=3", "privacy.delta=2"])


def test_an_unreadable_data_file_is_one_line_naming_it(tmp_path):
    import shutil

    data = adult_csv(tmp_path / "data.csv", 0, 300)
    data.chmod(0)
    command = [sys.executable, "-m", "privet.experiments.cli", "simulate", "--config", str(TINY),
               "--out", str(tmp_path / "run"), *(a for s in (*FAST, *CSV, "data.path="
               + json.dumps(str(data))) for a in ("--set", s))]
    if os.geteuid() == 0:  # root reads any file: run without that capability
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    done = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True,
                          timeout=300)
    code, stdout = done.returncode, done.stdout + done.stderr
    line = one_error_line(stdout)
    assert code == 2 and line.startswith(f"privet: error: {data}: permission denied")


# --- 10. what a person reads is right -------------------------------------------------------

def test_the_written_config_keeps_tables_as_tables(tmp_path):
    cfg = load_config(TINY, ["privacy.client-epsilon={ 1 = 1.0 }"])
    text = cfg.to_toml()
    assert "classes = []" in text and "categories = {}" in text
    assert 'missing-markers = ["?", "NA"' in text and "client-epsilon = { 1 = 1.0 }" in text
    (tmp_path / "again.toml").write_text(text)
    assert load_config(tmp_path / "again.toml") == cfg


# --- 12. left-out clients and user-level sampling ------------------------------------------

def test_user_level_divides_by_the_cohort_expected_of_the_clients_left(task_identity):
    """Each remaining client is still sampled with probability p (the ledger's rate); the
    noised sum is divided by p × (clients not left out)."""
    from flwr.app import ArrayRecord, ConfigRecord

    from privet.server.user_dp import UserLevelDPFedAvg

    strategy = UserLevelDPFedAvg(noise_multiplier=1.0, clip=1.0, sample_rate=0.5,
                                 num_clients=10, seed=0)
    strategy.left_out = {1, 2, 3, 4}
    sent = strategy.configure_train(1, ArrayRecord({"w": torch.zeros(2)}), ConfigRecord({}),
                                    ConnectedNodes(list(range(1, 11))))
    assert not {m.metadata.dst_node_id for m in sent} & strategy.left_out
    assert strategy.round_expected == pytest.approx(0.5 * 6)
    strategy.ledger.record(strategy.ledger_noise, strategy.sample_rate, 1)
    assert strategy.ledger.history[0][1] == 0.5  # accounted at the rate applied


def test_the_suite_uses_no_fixed_flower_port_and_no_wall_clock_bound():
    """Tests open free ports only, kill by PID only, and assert no duration."""
    import re

    for path in (PROJECT_DIR / "tests").glob("test_*.py"):
        text = path.read_text()
        if path.name == "test_inputs.py":
            continue
        assert not re.search(r"\bpkill\b", text), path
        duration = r"(elapsed|time\.time\(\) - \w+|perf_counter\(\) - \w+) *<"
        assert not re.search(duration, text), path
    assert "pkill" not in (PROJECT_DIR / "README.md").read_text()
    assert sys.executable  # the suite runs in the project's environment


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_a_run_in_which_no_client_ever_trains_is_never_complete(tmp_path):
    """Run 1 spends every row's budget; run 2 (its clients fit their own preprocessing) can
    train nobody in any round: budget-exhausted, with the reason, not `complete`."""
    ledger = f"privacy.ledger-dir={json.dumps(str(tmp_path / 'ledgers'))}"
    code, stdout = simulate(tmp_path / "first", ledger, "rounds=1")
    assert code == 0, stdout[-3000:]
    code, stdout = simulate(tmp_path / "second", ledger, "preprocess.fit=local", "rounds=1")
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert code == 0 and summary["status"] == "budget-exhausted", stdout[-3000:]
    assert "no client trained in any round" in summary["stop_reason"]
    assert "no client trained in any round" in stdout


def test_bad_bounds_are_one_line_naming_the_override_and_leave_no_run_directory(tmp_path):
    for bounds, expected in (("{ age = [10, 5] }", "finite low < high"),
                             ("{ nope = [0, 1] }", "'nope' is not a numeric column")):
        code, stdout = simulate(tmp_path / "run", f"data.bounds={bounds}")
        line = one_error_line(stdout)
        assert code == 2 and expected in line and f"--set data.bounds={bounds}" in line
        assert not (tmp_path / "run").exists()


def test_only_errors_of_writing_the_run_directory_read_as_a_full_disk(tmp_path):
    """A data file that is not there is its own error, not "… while writing the results"."""
    import errno

    from privet.server.app import _writing_results

    run = tmp_path / "run"
    assert _writing_results(OSError(errno.ENOSPC, "No space left on device"), run)
    assert _writing_results(FileNotFoundError(errno.ENOENT, "gone", str(run / "rounds.csv")),
                            run)
    assert _writing_results(FileNotFoundError(errno.ENOENT, "gone", str(run)), run)
    assert not _writing_results(
        FileNotFoundError(errno.ENOENT, "no such file", str(tmp_path / "adult.data.gz")), run)
