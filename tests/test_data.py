import json

import numpy as np
import pandas as pd
import pytest

from privet.common.config import CONFIGS_DIR, load_config
from privet.common.data import adult
from privet.common.data.datasets import (
    client_data,
    encode_labels,
    partition_report,
    partitions,
    tabular_source,
)
from privet.common.data.datasets import test_data as load_test_split
from privet.common.data.preprocess import clean


def test_cleaning_counts_each_step():
    raw = pd.DataFrame({
        "age": [" 39", "50 ", "50 ", "?", "x1", "30"],
        "colour": [" red", "blue", "blue", " ?", "red", "red"],
        "label": ["yes", "no", "no", "yes", "no", "?"],
    })
    cleaned, report = clean(raw, numeric=["age"], label="label", missing_markers=["?"])
    assert report.rows_in == 6
    assert report.cells_trimmed == 5          # " 39", "50 " x2, " red", " ?"
    assert report.missing_cells == 2         # age "?", colour " ?"
    assert report.unparseable_numbers == 1   # "x1"
    assert report.duplicates_dropped == 1
    assert report.missing_label_dropped == 1
    assert report.rows_out == len(cleaned) == 4
    assert cleaned["age"].tolist()[:2] == [39.0, 50.0]
    assert cleaned["colour"].tolist()[0] == "red"


def test_every_client_has_the_same_columns_fitted_on_its_own_rows():
    cfg = load_config(CONFIGS_DIR / "adult.toml")
    clients = [client_data(cfg, i) for i in range(cfg.num_clients)]
    names = {c.feature_names for c in clients}
    width = len(adult.NUMERIC) + sum(len(v) + 1 for v in adult.CATEGORIES.values())
    assert len(names) == 1 and len(next(iter(names))) == width  # + one `other` per column
    for c in clients:
        numeric = c.features[:, :len(adult.NUMERIC)]
        # standardised with its own rows' statistics: mean 0, std 1 (or 0 for a constant)
        assert np.allclose(numeric.mean(0), 0, atol=1e-4)
        assert np.all(np.isclose(numeric.std(0), 1, atol=1e-3) | np.isclose(numeric.std(0), 0))
    assert sum(len(c) + c.cleaning.duplicates_dropped for c in clients) == 32561


def test_a_clients_transform_ignores_other_clients_rows(tmp_path):
    """Fitting is local: changing every other client's rows leaves client 0's features."""
    raw = adult.load_raw("train").iloc[:3000]
    path, test_path = tmp_path / "adult.csv", tmp_path / "test.csv"
    raw.to_csv(path, index=False)
    adult.load_raw("train").iloc[3000:3500].to_csv(test_path, index=False)
    overrides = ["data.dataset=csv", f"data.path={json.dumps(str(path))}",
                 f"data.test-path={json.dumps(str(test_path))}", "data.label=income", "data.partition=iid", "num-clients=3",
                 "clients-per-round=3"]
    cfg = load_config(CONFIGS_DIR / "adult.toml", overrides)
    before, other_before = client_data(cfg, 0), client_data(cfg, 1)
    rows = partitions(cfg)
    changed = raw.copy()
    for other in rows[1:]:
        changed.iloc[other, 0] = "90"  # every other client's ages
    changed.to_csv(path, index=False)
    tabular_source.cache_clear()
    again = load_config(CONFIGS_DIR / "adult.toml", [*overrides, "name=again"])
    after = client_data(again, 0)
    assert np.array_equal(before.features, after.features)
    assert not np.array_equal(client_data(again, 1).features[:, 0],
                              other_before.features[:, 0])  # the change did reach them


def test_test_split_and_labels():
    test = load_test_split(load_config(CONFIGS_DIR / "adult.toml"))
    assert len(test) == 16281 and set(np.unique(test.labels)) == {0, 1}
    assert test.labels.mean() == pytest.approx(0.2362, abs=1e-3)
    with pytest.raises(ValueError, match="unknown label value"):
        encode_labels([">50K", "maybe"], adult.CLASSES, "adult client 0")


@pytest.mark.parametrize("kind", ["iid", "dirichlet", "shards", "quantity", "natural"])
def test_partition_report_covers_every_row(kind):
    cfg = load_config(CONFIGS_DIR / "adult.toml", [f"data.partition={kind}",
                                                   "data.min-rows=10"])
    report = partition_report(cfg)
    assert len(report) == cfg.num_clients
    assert sum(r["rows"] for r in report) == 32561
    for r in report:
        assert r["label=<=50K"] + r["label=>50K"] == r["rows"]
    # Adult's train file has 4,262 cells marked "?"
    assert sum(r["missing-cells"] for r in report) == 4262
    if kind == "natural":  # the values each client holds are named
        assert report[0]["native-country"] == "United-States"
        assert "(missing)" in " + ".join(r["native-country"] for r in report)


def test_a_node_reads_its_own_file_with_a_declared_schema(tmp_path):
    mine = tmp_path / "node.csv"
    mine.write_text("age,colour,label\n30,red,no\n40,blue,yes\n50,green,yes\n35,,no\n")
    base = ["data.dataset=csv", "data.path=\"unused.csv\"", "data.label=label"]
    cfg = load_config(CONFIGS_DIR / "tiny.toml", [
        *base, "data.classes=[\"no\", \"yes\"]",
        "data.categories={ colour = [\"red\", \"blue\", \"green\", \"grey\"] }"])
    data = client_data(cfg, 0, data_path=str(mine))
    assert data.feature_names == ("age", "colour=red", "colour=blue", "colour=green",
                                  "colour=grey", "colour=other")
    assert data.labels.tolist() == [0, 1, 1, 0] and data.features.shape == (4, 6)
    undeclared = load_config(CONFIGS_DIR / "tiny.toml", [*base, "name=other"])
    with pytest.raises(ValueError, match="node.csv.*declare data.classes and data.categories"):
        client_data(undeclared, 0, data_path=str(mine))


def test_the_split_ignores_settings_that_do_not_decide_it():
    """Runs that differ only in rounds, cohort or privacy share one cached split."""
    base = load_config(CONFIGS_DIR / "adult.toml")
    other = load_config(CONFIGS_DIR / "adult.toml", [
        "min-clients=2", "clients-per-round=5", "rounds=3", "privacy.epsilon=1"])
    assert all((a == b).all() for a, b in zip(partitions(base), partitions(other)))
