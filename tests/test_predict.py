"""Scoring new rows with a run's model (`privet predict`, `Run.predict`): from the run
directory alone, encoded as training encoded its rows, and the run's own test rows get
exactly the run's test accuracy."""

import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from conftest import PROJECT_DIR

import privet
from privet.common import saved_model
from privet.common.config import CONFIGS_DIR
from privet.common.data import adult, datasets, images, tables
from privet.common.evaluation import logits
from experiments.examples import tabular

TINY = CONFIGS_DIR / "tiny.toml"
ADULT_TEST = adult.data_file("test")


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "privet.experiments.cli", *args],
                          cwd=PROJECT_DIR, text=True, capture_output=True, timeout=600)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The one `privet: error:` line of a refused command (exit 2, no traceback)."""
    output = proc.stdout + proc.stderr
    errors = [line for line in output.splitlines() if line.startswith("privet: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def adult_rows(n: int = 20) -> pd.DataFrame:
    """Adult test rows as a user's CSV would hold them: a header, labels as in the file."""
    return adult.load_raw("test").head(n).copy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Adult, 3 clients, 2 rounds, the shared DP-fitted transform."""
    return privet.simulate(TINY, {"rounds": 2}, out=tmp_path_factory.mktemp("tiny") / "run")


def test_adults_test_file_gets_exactly_the_runs_test_accuracy(tiny, tmp_path):
    out = tmp_path / "predictions.csv"
    proc = cli("predict", str(tiny.path), str(ADULT_TEST), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = pd.read_csv(out, keep_default_na=False)
    truth = [tables.normalise_label(v) for v in adult.load_raw("test")[adult.LABEL]]
    assert len(table) == len(truth) == 16281
    assert list(table["row"]) == list(range(1, 16282)) and table["line"].iloc[0] == 2
    # accuracy recomputed here, from the predictions and the file's labels
    correct = int((table["prediction"] == np.array(truth)).sum())
    reported = float(tiny.rounds["test_accuracy"].iloc[-1])  # rounds.csv: 6 decimals
    assert round(correct / len(truth), 6) == reported
    assert f"accuracy {correct / len(truth):.6f} ({correct} of 16281 labelled" in proc.stdout
    # and row by row what the server computed on its test rows
    cfg, transform = tiny.config, (tiny.path / "transform.json").read_text()
    server = logits(tiny.model(), datasets.test_data(cfg, transform).features).argmax(1)
    classes = np.array(datasets.classes(cfg))
    assert (classes[server.numpy()] == table["prediction"].to_numpy()).all()
    probabilities = table[[f"prob_{c}" for c in classes]].to_numpy()
    assert np.allclose(probabilities.sum(axis=1), 1.0)
    assert (classes[probabilities.argmax(axis=1)] == table["prediction"]).all()
    # from Python: the same predictions, the frame's index kept
    frame = adult.load_raw("test")
    scored = tiny.predict(frame)
    assert scored.attrs["scores"]["correct"] == correct
    assert (scored["prediction"].to_numpy() == table["prediction"].to_numpy()).all()
    assert scored.index.equals(frame.index)


def test_the_run_directory_alone_rebuilds_the_model_and_encodes_rows(tiny, tmp_path,
                                                                    monkeypatch):
    copy = tmp_path / "elsewhere"
    shutil.copytree(tiny.path, copy)
    spec = saved_model.read(copy, tiny.config)
    assert spec.encoding == "shared" and spec.classes == tuple(adult.CLASSES)
    assert spec.transform == (tiny.path / "transform.json").read_text()

    rows = adult_rows()  # read before the data is hidden

    def no_data(*args, **kwargs):
        raise AssertionError("read the training data")

    monkeypatch.setattr(datasets, "tabular_source", no_data)
    monkeypatch.setattr(adult, "load_raw", no_data)
    run = privet.load_run(copy)
    model = run.model()
    assert next(model.parameters()).shape[1] == spec.input_shape[0]
    scored = run.predict(rows)
    assert len(scored) == 20 and scored.attrs["scores"]["rows"] == 20


def test_unlabelled_rows_unseen_values_and_duplicates_are_all_scored(tiny, tmp_path):
    rows = adult_rows(6)
    rows.loc[1, "workclass"] = "Astronaut"      # outside the vocabulary: `other`
    rows.loc[2, "hours-per-week"] = "inf"        # not finite: missing, as in training
    rows.loc[3, adult.LABEL] = "?"               # a missing label: left out of the accuracy
    rows.loc[4] = rows.loc[0]                     # a duplicate: scored all the same
    path = tmp_path / "new.csv"
    rows.to_csv(path, index=False)
    out = tmp_path / "p.csv"
    proc = cli("predict", str(tiny.path), str(path), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = pd.read_csv(out)
    assert list(table["row"]) == [1, 2, 3, 4, 5, 6] and list(table["line"]) == [2, 3, 4, 5, 6, 7]
    assert table.loc[4, "prediction"] == table.loc[0, "prediction"]
    assert "'Astronaut'" in proc.stderr and "encoded as `other`" in proc.stderr
    assert "non-finite" in proc.stderr and f"{path}, line 4: 'inf'" in proc.stderr
    assert "1 row(s) without a label" in proc.stderr and f"{path}, line 5" in proc.stderr
    assert "of 5 labelled row(s)" in proc.stdout
    rows.drop(columns=[adult.LABEL]).to_csv(path, index=False)   # no label column at all
    proc = cli("predict", str(tiny.path), str(path), "--out", str(out))
    assert proc.returncode == 0 and "accuracy" not in proc.stdout
    assert len(pd.read_csv(out)) == 6


def test_bad_input_is_one_line_naming_the_file_line_and_column(tiny, tmp_path):
    out = tmp_path / "p.csv"
    path = tmp_path / "new.csv"
    adult_rows().drop(columns=["age"]).to_csv(path, index=False)
    line = one_line_error(cli("predict", str(tiny.path), str(path), "--out", str(out)))
    assert f"{path}: column(s) 'age' missing" in line and "optional" in line
    rows = adult_rows()
    rows.loc[2, "age"] = "forty"
    rows.to_csv(path, index=False)
    line = one_line_error(cli("predict", str(tiny.path), str(path), "--out", str(out)))
    assert f"{path}, line 4: column 'age': 'forty' is not a number" in line
    binary = tmp_path / "blob.csv"
    binary.write_bytes(b"age,workclass\n\xff\xfe\x00\x01")
    line = one_line_error(cli("predict", str(tiny.path), str(binary), "--out", str(out)))
    assert f"{binary}, line 2: not UTF-8" in line
    line = one_line_error(cli("predict", str(tiny.path), str(tmp_path / "none.csv")))
    assert "no such file" in line
    line = one_line_error(cli("predict", str(tmp_path), str(path), "--out", str(out)))
    assert f"{tmp_path}: not a privet run directory" in line
    assert not out.exists()
    with pytest.raises(privet.PrivetError, match="column\\(s\\) 'age' missing") as error:
        tiny.predict(adult_rows().drop(columns=["age"]))
    assert error.value.code == 2
    with pytest.raises(privet.PrivetError, match="expected a pandas DataFrame"):
        tiny.predict(np.zeros((2, 113)))


def test_never_writes_over_a_file_it_did_not_write(tiny, tmp_path):
    path = tmp_path / "new.csv"
    adult_rows(5).to_csv(path, index=False)
    mine = tmp_path / "mine.csv"
    mine.write_text("a,b\n1,2\n")
    line = one_line_error(cli("predict", str(tiny.path), str(path), "--out", str(mine)))
    assert "not written by privet predict" in line and mine.read_text() == "a,b\n1,2\n"
    line = one_line_error(cli("predict", str(tiny.path), str(path), "--out", str(path)))
    assert "the input file" in line
    out = tmp_path / "p.csv"
    for _ in range(2):  # its own output it replaces
        assert cli("predict", str(tiny.path), str(path), "--out", str(out)).returncode == 0
    assert len(pd.read_csv(out)) == 5


def test_a_run_with_per_client_transforms_is_refused_and_says_what_to_do(tmp_path):
    run = privet.simulate(TINY, {"rounds": 1, "preprocess.fit": "local"}, out=tmp_path / "run")
    path = tmp_path / "new.csv"
    adult_rows(5).to_csv(path, index=False)
    line = one_line_error(cli("predict", str(run.path), str(path), "--out",
                              str(tmp_path / "p.csv")))
    assert "cannot score new rows" in line and "preprocess.fit = \"local\"" in line
    assert "re-run with preprocess.fit = \"federated\"" in line
    with pytest.raises(privet.PrivetError, match="cannot score new rows"):
        run.predict(adult_rows(5))
    assert run.model() is not None  # the model itself is rebuilt all the same


@pytest.mark.slow
def test_regression_predictions_are_in_the_labels_units(tmp_path):
    run = privet.simulate(CONFIGS_DIR / "adult-regression.toml",
                          {"rounds": 2, "num-clients": 3, "clients-per-round": 3},
                          out=tmp_path / "run")
    frame = adult.load_raw("test")  # income written ">50K." as in the shipped test file
    scored = run.predict(frame)
    assert list(scored.columns) == ["prediction"]
    age = frame["age"].astype(float).to_numpy()
    rmse = float(np.sqrt(((scored["prediction"].to_numpy() - age) ** 2).mean()))
    assert rmse == pytest.approx(float(run.rounds["test_rmse"].iloc[-1]), rel=1e-5)
    assert scored.attrs["scores"]["rmse"] == pytest.approx(rmse, rel=1e-12)
    assert 20 < scored["prediction"].median() < 60  # years, not the scaled target in [-1, 1]
    proc = cli("predict", str(run.path), str(ADULT_TEST), "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 0 and "in the label's units" in proc.stdout
    assert pd.read_csv(tmp_path / "p.csv")["prediction"].to_numpy() == pytest.approx(
        scored["prediction"].to_numpy())


@pytest.mark.slow
def test_a_csv_run_with_a_users_model_needs_neither_its_file_nor_its_folder(tmp_path):
    """A `;` file with a decimal-comma column, a user's factory taking `features`: after
    training, the data file goes away and the run directory moves; scoring still works,
    numbers read in the format training found."""
    data = tmp_path / "data"
    data.mkdir()
    rows = adult.load_raw("train").head(3000).copy()
    rows["score"] = [f"{i % 40},5" for i in range(len(rows))]
    rows.to_csv(data / "people.csv", sep=";", index=False)
    run = privet.simulate(TINY, {"rounds": 1, "data.dataset": "csv",
                                 "data.path": str(data / "people.csv"),
                                 "data.label": "income"},
                          model=tabular.embedding_mlp, out=tmp_path / "run")
    shutil.rmtree(data)
    moved = tmp_path / "moved"
    shutil.move(run.path, moved)
    run = privet.load_run(moved)
    assert isinstance(run.model(), tabular.EmbeddingMLP)
    new = adult_rows(4).assign(score=["12,5", "3,5", "", "7,5"])
    new[adult.LABEL] = [tables.normalise_label(v) for v in new[adult.LABEL]]
    path = tmp_path / "new.csv"
    new.to_csv(path, sep=";", index=False)
    proc = cli("predict", str(moved), str(path), "--out", str(tmp_path / "p.csv"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(pd.read_csv(tmp_path / "p.csv")) == 4 and "of 4 labelled" in proc.stdout
    scored = run.predict(new)
    assert set(scored["prediction"]) <= {"<=50K", ">50K"}
    numbers = run.predict(new.assign(score=[12.5, 3.5, None, 7.5]))  # floats: as Python writes
    assert (numbers["prob_>50K"] == scored["prob_>50K"]).all()
    new.loc[1, "score"] = "3.5.1"
    new.to_csv(path, sep=";", index=False)
    line = one_line_error(cli("predict", str(moved), str(path)))
    assert f"{path}, line 3: column 'score': '3.5.1' is not a number; expected a number " \
           "(no thousands separator, ',' as decimal mark, as in training)" in line


@pytest.mark.slow
def test_image_runs_need_no_transform(tmp_path):
    run = privet.simulate(CONFIGS_DIR / "digits.toml",
                          {"rounds": 2, "num-clients": 3, "clients-per-round": 3,
                           "data.partition": "iid"}, out=tmp_path / "run")
    cfg = run.config
    test = images.load_digits("test", seed=cfg.seed, test_fraction=cfg.data.test_fraction)
    scored = run.predict(test.images, labels=test.labels)
    predicted = scored["prediction"].astype(int).to_numpy()
    correct = int((predicted == test.labels).sum())
    assert round(correct / len(test.labels), 6) == float(run.rounds["test_accuracy"].iloc[-1])
    assert scored.attrs["scores"]["correct"] == correct
    from PIL import Image

    folder = tmp_path / "images"
    (folder / "3").mkdir(parents=True)
    (folder / "misc").mkdir()
    picture = Image.fromarray((test.images[0, 0] * 255).round().astype(np.uint8))
    picture.save(folder / "3" / "a.png")
    picture.save(folder / "misc" / "b.png")
    picture.save(folder / "c.png")
    out = tmp_path / "p.csv"
    proc = cli("predict", str(run.path), str(folder), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    table = pd.read_csv(out)
    assert list(table["file"]) == ["3/a.png", "c.png", "misc/b.png"]
    assert table["prediction"].nunique() == 1  # the same picture three times
    assert "of 1 labelled" in proc.stdout and "'misc'" in proc.stderr
    with pytest.raises(privet.PrivetError, match="expected \\(N, 1, 8, 8\\)"):
        run.predict(np.zeros((2, 64)))


def test_export_writes_a_torch_export_program_carrying_the_encoding(tiny, tmp_path):
    import json
    import torch

    out = tmp_path / "model.pt2"
    proc = cli("export", str(tiny.path), "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "float32 (N, 113) in, logits over <=50K, >50K out" in proc.stdout
    extra = {"privet.json": ""}
    program = torch.export.load(out, extra_files=extra).module()
    note = json.loads(extra["privet.json"])
    assert note["round"] == 2 and note["model"]["encoding"] == "shared"
    transform = (tiny.path / "transform.json").read_text()
    assert note["model"]["transform"] == json.loads(transform)
    features = torch.from_numpy(datasets.test_data(tiny.config, transform).features[:100])
    assert torch.equal(program(features), tiny.model()(features))
    assert cli("export", str(tiny.path), "--out", str(out)).returncode == 0  # its own: replaced
    mine = tmp_path / "mine.pt2"
    mine.write_bytes(b"precious")
    line = one_line_error(cli("export", str(tiny.path), "--out", str(mine)))
    assert "not written by privet export" in line and mine.read_bytes() == b"precious"
