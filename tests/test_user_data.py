"""Users' own datasets: a loader named by import path (`data.dataset = "module:loader"`,
returning a DataFrame, arrays or a torch Dataset) and a folder of images (`image-folder`)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT_DIR
from test_inputs import adult_csv, one_error_line
from test_user_dp import task_identity  # noqa: F401 (a fixture)

from privet.common.config import CONFIGS_DIR, load_config
from privet.common.data import datasets, images, loader
from privet.common.data.tables import DataError

TINY = CONFIGS_DIR / "tiny.toml"
SMALL = ["data.partition=iid", "data.min-rows=16", "train.batch-size=16"]

LOADERS = '''
import numpy as np
import pandas as pd
import torch


def frame(data):
    """The CSV file data.path names, as pandas reads it (spaces after commas skipped, as
    privet's reader does)."""
    return pd.read_csv(data.path, skipinitialspace=True)


def _points(rows=900, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, rows)
    features = rng.normal(size=(rows, 6)).astype(np.float32) * 0.5
    features[np.arange(rows), labels] += 2.0  # class k: feature k is large
    return features, labels


def arrays():
    return _points()


def named_arrays(data):
    x, y = _points()
    names = ["red", "green", "blue"]
    return {"train": (x[:700], y[:700], names), "test": (x[700:], y[700:], names)}


class Points(torch.utils.data.Dataset):
    classes = ["red", "green", "blue"]

    def __init__(self):
        self.x, self.y = _points()

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return torch.from_numpy(self.x[i]), int(self.y[i])


def dataset(data):
    return Points()


def wrong(data):
    return [1, 2, 3]


def fails(data):
    raise RuntimeError("the database is down\\n(try later)")


def ragged():
    return np.ones((10, 3), dtype=np.float32), np.zeros(9)


def not_finite():
    x, y = _points()
    x[5, 2] = np.nan
    return x, y


def saved(data):
    """A deployed node's own file (data.path is its data-path)."""
    found = np.load(data.path)
    return found["x"], found["y"], ["red", "green", "blue"]


NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A user's folder holding their loader module (`userdata`), importable here too."""
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "userdata.py").write_text(LOADERS)
    monkeypatch.syspath_prepend(str(folder))
    for cached in (loader.load, datasets.image_source, datasets.tabular_source):
        cached.cache_clear()
    yield folder
    sys.modules.pop("userdata", None)


def simulate_in(folder: Path, out: Path, *settings: str, timeout: int = 600
                ) -> tuple[int, str]:
    """`privet simulate` run from the user's folder (its loader module is found there)."""
    args = [sys.executable, "-m", "privet.experiments.cli", "simulate", "--config", str(TINY),
            "--out", str(out)]
    for setting in settings:
        args += ["--set", setting]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(PROJECT_DIR), os.environ.get("PYTHONPATH", "")]))}
    proc = subprocess.Popen(args, cwd=folder, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    stdout, _ = proc.communicate(timeout=timeout)
    return proc.returncode, stdout


def config(*settings: str):
    return load_config(TINY, [*SMALL, *settings])


def quoted(text) -> str:
    return json.dumps(str(text))


# --- a loader by import path -------------------------------------------------------------

@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_a_loaders_dataframe_is_the_same_data_as_the_csv_file_it_read(user_folder, tmp_path):
    """A DataFrame goes through the tabular pipeline exactly as the same rows in a CSV file
    do: the same clients, the same DP-SGD plan, the same ε (and the same model)."""
    data = adult_csv(tmp_path / "adult.csv", 0, 1500)
    common = ["data.label=income", "data.partition=iid", f"data.path={quoted(data)}",
              "rounds=2"]
    code, stdout = simulate_in(user_folder, tmp_path / "csv", "data.dataset=csv", *common)
    assert code == 0, stdout[-3000:]
    code, stdout = simulate_in(user_folder, tmp_path / "loader",
                               'data.dataset="userdata:frame"', *common)
    assert code == 0, stdout[-3000:]
    csv, loaded = (json.loads((tmp_path / run / "summary.json").read_text())
                   for run in ("csv", "loader"))
    assert loaded["status"] == "complete" and np.isfinite(loaded["accuracy"])
    spent = {c: e["epsilon"] for c, e in loaded["privacy"]["clients"].items()}
    assert spent == {c: e["epsilon"] for c, e in csv["privacy"]["clients"].items()}
    assert 0 < max(spent.values()) <= 2.0
    assert loaded["accuracy"] == csv["accuracy"]
    assert loaded["classes"] == csv["classes"] == ["<=50K", ">50K"]
    assert loaded["data"] == csv["data"]  # the same cleaning counts per client


def test_a_loader_returning_arrays_is_used_as_it_is(user_folder):
    cfg = config('data.dataset="userdata:arrays"')
    assert not cfg.data.tabular and not cfg.federated_preprocessing
    x, y = __import__("userdata").arrays()
    parts = datasets.partitions(cfg)
    test = datasets.test_data(cfg)
    assert sum(map(len, parts)) + len(test) == len(y)  # test-fraction held out, the rest split
    assert len(test) == round(0.2 * len(y))
    assert datasets.classes(cfg) == ("0", "1", "2")
    assert datasets.model_input_shape(cfg) == (6,)
    assert datasets.client_transform(cfg, 0) is None  # no tabular preprocessing
    own = datasets.client_data(cfg, 1)
    source = datasets.image_source(cfg.data, cfg.seed).train
    np.testing.assert_array_equal(own.features, source.images[parts[1]])
    rows = {tuple(r) for r in x.round(6).tolist()}
    assert all(tuple(r) in rows for r in own.features.round(6).tolist())  # values untouched


def test_a_loader_may_name_its_classes_and_give_a_test_split(user_folder):
    cfg = config('data.dataset="userdata:named_arrays"')
    assert datasets.classes(cfg) == ("red", "green", "blue")
    assert len(datasets.test_data(cfg)) == 200
    assert sum(map(len, datasets.partitions(cfg))) == 700


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_a_torch_dataset_is_read_into_arrays_and_trains(user_folder, tmp_path):
    cfg = config('data.dataset="userdata:dataset"')
    assert not cfg.data.tabular
    assert datasets.classes(cfg) == ("red", "green", "blue")  # its `classes` attribute
    x, y = __import__("userdata").arrays()
    source = datasets.image_source(cfg.data, cfg.seed)
    assert len(source.train) + len(source.test) == len(y)
    code, stdout = simulate_in(user_folder, tmp_path / "run", 'data.dataset="userdata:dataset"',
                               *SMALL, "rounds=2", "privacy.epsilon=4")
    assert code == 0, stdout[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["classes"] == ["red", "green", "blue"]
    assert summary["accuracy"] > 0.8, summary["accuracy"]  # three well separated classes
    assert 0 < summary["privacy"]["max_epsilon"] <= 4.0
    assert any("returned arrays, trained on as they are" in line
               for line in summary["privacy"]["not_covered"])


@pytest.mark.parametrize("reference, expected", [
    ("no_such_module_q:load", "cannot import 'no_such_module_q'"),
    ("userdata:nothing", "'userdata' has no 'nothing'"),
    ("userdata:NOT_A_FUNCTION", "is not callable"),
    ("userdata:wrong", "the loader returned list; expected a pandas DataFrame, arrays "
                       "(features, labels), a torch Dataset"),
    ("userdata:fails", "the loader failed: RuntimeError: the database is down (try later)"),
    ("userdata:ragged", "labels have shape (9,) for 10 rows"),
    ("userdata:not_finite", "1 row(s) with values that are not finite"),
])
def test_a_loader_that_cannot_be_used_is_one_line_naming_it(user_folder, reference, expected):
    cfg = config(f'data.dataset="{reference}"')
    with pytest.raises(loader.DatasetError) as error:
        datasets.partition_report(cfg)
    message = str(error.value)
    assert message.startswith(f"data.dataset = {reference!r}: ") and "\n" not in message
    assert expected in message


def test_the_cli_refuses_a_bad_loader_in_one_line(user_folder, tmp_path):
    """Every refusal above is a DatasetError, which the CLI prints as it is (one process
    start is enough to show it)."""
    reference = "userdata:wrong"
    code, stdout = simulate_in(user_folder, tmp_path / "run", f'data.dataset="{reference}"')
    line = one_error_line(stdout)
    assert code != 0 and f"data.dataset = {reference!r}: the loader returned list" in line
    assert not (tmp_path / "run").exists()  # refused before anything ran


def test_a_bad_dataset_name_is_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match=r"data\.dataset = 'nonsense': expected one of 'adult'"
                                         r".*'image-folder', or an import path"):
        load_config(TINY, ["data.dataset=nonsense"])


# --- a folder of images ------------------------------------------------------------------

PATTERNS = {  # a visible pattern per class, on noise
    "bars": lambda a: a.__setitem__((slice(None), slice(5, 7)), 250),
    "box": lambda a: a.__setitem__((slice(3, 9), slice(3, 9)), 250),
    "stripes": lambda a: a.__setitem__((slice(5, 7), slice(None)), 250),
}


def image_folder(root: Path, per_class: int = 60, seed: int = 0, size: int = 12,
                 rgb: bool = False) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name, draw in PATTERNS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 60, (size, size), dtype=np.uint8)
            draw(pixels)
            image = Image.fromarray(pixels)
            (image.convert("RGB") if rgb else image).save(root / name / f"{i:03d}.png")
    return root


def test_an_image_folder_reads_one_class_per_subfolder(tmp_path):
    root = image_folder(tmp_path / "images", per_class=4, size=10, rgb=True)
    (root / "README.txt").write_text("not an image")
    (root / "box" / ".hidden.png").write_bytes(b"skipped: hidden")
    split, warnings = images.load_image_folder(root, size=6, channels=1)
    assert split.classes == ("bars", "box", "stripes")  # sorted subfolder names
    assert split.images.shape == (12, 1, 6, 6) and split.images.dtype == np.float32
    assert 0.0 <= split.images.min() and split.images.max() <= 1.0
    assert list(split.labels) == [0] * 4 + [1] * 4 + [2] * 4
    assert len(warnings) == 1 and "README.txt" in warnings[0]
    rgb, _ = images.load_image_folder(root, size=8, channels=3)
    assert rgb.images.shape == (12, 3, 8, 8)
    declared, _ = images.load_image_folder(root, size=6, channels=1,
                                           classes=("stripes", "box", "bars", "empty"))
    assert declared.classes == ("stripes", "box", "bars", "empty")
    assert list(declared.labels[:4]) == [0] * 4  # stripes first, as declared


def test_a_bad_image_folder_is_one_line_naming_what_is_wrong(tmp_path):
    root = image_folder(tmp_path / "images", per_class=2, size=6)
    broken = root / "box" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a picture")
    with pytest.raises(DataError) as error:
        images.load_image_folder(root, size=6, channels=1)
    assert str(error.value).startswith(f"{broken}: cannot read this image")
    broken.unlink()
    (root / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no images in this class folder"):
        images.load_image_folder(root, size=6, channels=1)
    for problem, expected in ((tmp_path / "nowhere", "no such folder"),
                              (tmp_path / "flat", "no class subfolders")):
        (tmp_path / "flat").mkdir(exist_ok=True)
        with pytest.raises(DataError) as error:
            images.load_image_folder(problem, size=6, channels=1)
        assert expected in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DataError, match=r"subfolder\(s\) \['box'\] not among data.classes"):
        images.load_image_folder(tmp_path / "images", size=6, channels=1,
                                 classes=("bars", "stripes", "empty"))


def test_an_image_folder_with_a_test_folder_and_on_a_deployed_node(tmp_path):
    train = image_folder(tmp_path / "train", per_class=20)
    test = image_folder(tmp_path / "test", per_class=5, seed=1)
    cfg = config("data.dataset=image-folder", f"data.path={quoted(train)}",
                 f"data.test-path={quoted(test)}", "data.image-size=8",
                 "data.image-channels=1")
    assert not cfg.data.tabular and datasets.model_input_shape(cfg) == (1, 8, 8)
    assert len(datasets.test_data(cfg)) == 15
    assert sum(map(len, datasets.partitions(cfg))) == 60
    # a deployed node reads its own folder, all of it, whatever its partition-id says
    node = image_folder(tmp_path / "node", per_class=3, seed=2)
    own = datasets.client_data(cfg, 2, "", str(node))
    assert own.features.shape == (9, 1, 8, 8)
    assert datasets.classes(cfg, str(node)) == ("bars", "box", "stripes")
    assert len(datasets.client_digests(cfg, 2, str(node))) == 9


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_an_image_folder_trains_end_to_end_and_names_its_classes(tmp_path):
    root = image_folder(tmp_path / "images")
    (root / "notes.txt").write_text("passed over, and said")
    code, stdout = simulate_in(
        tmp_path, tmp_path / "run", "data.dataset=image-folder", f"data.path={quoted(root)}",
        "data.image-size=8", "data.image-channels=1", "train.model=cnn", *SMALL, "rounds=5",
        "train.local-epochs=2", "privacy.epsilon=8")
    assert code == 0, stdout[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "complete"
    assert summary["classes"] == ["bars", "box", "stripes"]
    assert 0 < summary["privacy"]["max_epsilon"] <= 8.0
    assert summary["accuracy"] >= 0.8, summary["accuracy"]  # the patterns are learnt (1/3: chance)
    assert any("notes.txt" in line for line in summary["data_warnings"])
    partitions = (tmp_path / "run" / "partitions.csv").read_text().splitlines()[0]
    assert all(f"label={name}" in partitions for name in PATTERNS)


def test_an_unreadable_image_stops_the_run_in_one_line_naming_the_file(tmp_path):
    root = image_folder(tmp_path / "images", per_class=30)
    broken = root / "stripes" / "zz-truncated.png"
    broken.write_bytes((root / "stripes" / "000.png").read_bytes()[:40])
    code, stdout = simulate_in(tmp_path, tmp_path / "run", "data.dataset=image-folder",
                               f"data.path={quoted(root)}", *SMALL)
    line = one_error_line(stdout)
    assert code != 0 and str(broken) in line and "cannot read this image" in line


def test_whether_the_tabular_pipeline_applies_is_asked_in_one_place(user_folder, tmp_path):
    assert config().data.tabular  # adult
    assert not config("data.dataset=digits").data.tabular
    assert not config("data.dataset=image-folder", 'data.path="x"').data.tabular
    assert not config('data.dataset="userdata:arrays"').data.tabular
    frame = config('data.dataset="userdata:frame"', "data.label=income",
                   f"data.path={quoted(adult_csv(tmp_path / 'a.csv', 0, 300))}")
    assert frame.data.tabular and frame.federated_preprocessing
    code = "\n".join(p.read_text() for p in (PROJECT_DIR / "privet").rglob("*.py"))
    assert "dataset in IMAGE_DATASETS" not in code and "dataset not in IMAGE_DATASETS" not in code


def test_both_forms_are_documented():
    readme = (PROJECT_DIR / "README.md").read_text()
    section = readme[readme.index("### Your own data"):]
    section = section[:section.index("\n## ")]
    for promise in ('dataset = "image-folder"', "package.module:loader", "pandas DataFrame",
                    "(features, labels)", "torch Dataset", '"test"', "image-channels",
                    "image-size", "data-path"):
        assert promise in section.replace("`", ""), promise
    for promise in ("pandas DataFrame", "(features, labels)", "torch `Dataset`", '"test"',
                    "DatasetError"):
        assert promise in loader.__doc__, promise


# --- deployment: each node reads its own data --------------------------------------------

def _node_replies(cfg, data_path: Path, ledger_folder: Path):
    """What a deployed node's ClientApp answers to `describe` and to one round of `train`."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from privet.clients import app as client_app
    from privet.common import records as R
    from privet.common.models import build_model

    context = Context(run_id=1, node_id=1, node_config={"partition-id": 1,
                                                        "data-path": str(data_path)},
                      state=RecordDict(), run_config=cfg.to_run_config())
    described = client_app.describe(Message(RecordDict({"config": ConfigRecord({})}),
                                            dst_node_id=1, message_type="query.describe"),
                                    context).content["describe"]
    model = build_model(cfg.train, tuple(described["input-shape"]), len(described["classes"]))
    trained = client_app.train(Message(RecordDict({
        "arrays": R.to_arrays(model),
        "config": ConfigRecord({"server-round": 1, R.RUN: "deployed"})}),
        dst_node_id=1, message_type="train"), context).content
    assert R.FAILURE not in trained, trained[R.FAILURE]
    assert any(ledger_folder.iterdir())  # its ledger sits next to its data
    return described, trained["metrics"]


def test_deployed_nodes_read_their_own_image_folder_or_loader_rows(user_folder, tmp_path,
                                                                   task_identity):
    from privet.common import records as R

    node = image_folder(tmp_path / "node" / "images", per_class=10, seed=3)
    cfg = load_config(TINY, ["num-clients=2", "clients-per-round=2", "train.batch-size=8",
                             "data.dataset=image-folder", 'data.path="not-on-this-node"',
                             'data.classes=["bars", "box", "stripes"]', "data.image-size=8",
                             "data.image-channels=1"])
    described, metrics = _node_replies(cfg, node, tmp_path / "node")
    assert list(described["classes"]) == ["bars", "box", "stripes"]
    assert list(described["input-shape"]) == [1, 8, 8] and described["rows"] == 30
    assert metrics[R.NUM_EXAMPLES] > 0 and 0 < metrics[R.EPSILON] <= 2.0
    # a loader on a node is called with data.path = its data-path (the experiment's own
    # data.path is not there: asking whether the data is a table must not read it)
    x, y = __import__("userdata").arrays()
    (tmp_path / "other").mkdir()
    np.savez(tmp_path / "other" / "mine.npz", x=x[:40], y=y[:40])
    cfg = load_config(TINY, ["num-clients=2", "clients-per-round=2", "train.batch-size=8",
                             'data.dataset="userdata:saved"', 'data.path="not-here.npz"'])
    described, metrics = _node_replies(cfg, tmp_path / "other" / "mine.npz",
                                       tmp_path / "other")
    assert list(described["classes"]) == ["red", "green", "blue"] and described["rows"] == 40
    assert list(described["input-shape"]) == [6] and metrics[R.NUM_EXAMPLES] > 0


def test_a_deployment_refuses_a_loader_flower_would_not_ship(user_folder):
    from privet.common.models import shipped_with_app

    assert shipped_with_app("experiments.examples.tabular:residual_mlp", PROJECT_DIR,
                            "data.dataset") is None  # in the app folder: shipped
    outside = shipped_with_app("userdata:arrays", PROJECT_DIR, "data.dataset")
    assert outside.startswith("data.dataset = 'userdata:arrays': ")
    assert "outside the app folder" in outside
