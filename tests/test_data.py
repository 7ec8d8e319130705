import numpy as np
import pandas as pd
import pytest

from common.config import CONFIGS_DIR, load_config
from common.data import adult
from common.data.datasets import client_data, encode_labels, num_features
from common.data.datasets import test_data as load_test_split
from common.data.partition import dirichlet, iid
from common.data.preprocess import clean, make_transform


def test_partitions_assign_every_row_once_and_are_deterministic():
    labels = np.array(["a"] * 700 + ["b"] * 300)
    for parts in (iid(1000, 7, seed=1), dirichlet(labels, 7, 0.5, seed=1, min_rows=20)):
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(1000))
    assert all((a == b).all() for a, b in zip(dirichlet(labels, 7, 0.5, 3, 20),
                                              dirichlet(labels, 7, 0.5, 3, 20)))
    assert min(len(p) for p in dirichlet(labels, 7, 0.5, 3, min_rows=50)) >= 50


def test_dirichlet_alpha_controls_label_skew():
    labels = np.array(["a"] * 5000 + ["b"] * 5000)

    def spread(alpha):
        parts = dirichlet(labels, 10, alpha, seed=0, min_rows=1)
        return np.std([np.mean(labels[p] == "a") for p in parts])

    assert spread(0.1) > spread(1.0) > spread(100.0)
    with pytest.raises(ValueError, match="cannot give"):
        dirichlet(labels[:10], 5, 0.5, seed=0, min_rows=5)


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


def test_transform_uses_schema_vocabulary_and_own_statistics():
    categories = {"colour": ["red", "blue", "green"]}
    rows = pd.DataFrame({"age": [10.0, 20.0, np.nan, 30.0], "colour": ["red", None, "red",
                                                                       "purple"]})
    t = make_transform(["age"], categories)
    x = t.fit_transform(rows)
    assert x.shape == (4, 4)  # age + 3 schema colours, "green" never seen
    assert list(t.get_feature_names_out())[1:] == ["categorical__colour_red",
                                                   "categorical__colour_blue",
                                                   "categorical__colour_green"]
    assert x[:, 0].mean() == pytest.approx(0.0, abs=1e-9)  # standardised on these rows
    assert x[2, 0] == pytest.approx(0.0)  # median-imputed = 20 -> centred
    assert x[3, 1:].tolist() == [0, 0, 0]  # unknown category: no column lit
    assert x[1, 1:].tolist() == [1, 0, 0]  # missing -> most frequent ("red")


def test_every_client_has_the_same_columns_fitted_on_its_own_rows():
    cfg = load_config(CONFIGS_DIR / "adult.toml")
    clients = [client_data(cfg, i) for i in range(cfg.num_clients)]
    names = {c.feature_names for c in clients}
    assert len(names) == 1 and len(next(iter(names))) == num_features("adult")
    for c in clients:
        numeric = c.features[:, :len(adult.NUMERIC)]
        # standardised with its own rows' statistics: mean 0, std 1 (or 0 for a constant)
        assert np.allclose(numeric.mean(0), 0, atol=1e-4)
        assert np.all(np.isclose(numeric.std(0), 1, atol=1e-3) | np.isclose(numeric.std(0), 0))
    assert sum(len(c) + c.cleaning.duplicates_dropped for c in clients) == 32561


def test_a_clients_transform_ignores_other_clients_rows():
    """Fitting is local: changing every other row leaves a client's features unchanged."""
    raw = adult.load_raw("train")
    mine, others = raw.iloc[:500], raw.iloc[500:2000].copy()
    others["age"] = "90"
    kwargs = dict(numeric=adult.NUMERIC, label=adult.LABEL, missing_markers=["?"])
    a, _ = clean(mine, **kwargs)
    features_alone = make_transform(adult.NUMERIC, adult.CATEGORIES).fit_transform(
        a.drop(columns=[adult.LABEL]))
    # the same client, inside a federation whose other members changed their data
    both, _ = clean(pd.concat([mine, others]), **kwargs)
    mine_again = both.iloc[:len(a)]
    features_again = make_transform(adult.NUMERIC, adult.CATEGORIES).fit_transform(
        mine_again.drop(columns=[adult.LABEL]))
    assert np.array_equal(features_alone, features_again)


def test_test_split_and_labels():
    test = load_test_split("adult")
    assert len(test) == 16281 and set(np.unique(test.labels)) == {0, 1}
    assert test.labels.mean() == pytest.approx(0.2362, abs=1e-3)
    with pytest.raises(ValueError, match="unknown label value"):
        encode_labels([">50K", "maybe"], adult.CLASSES, "adult client 0")
