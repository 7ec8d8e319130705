"""Drift mode's tables (privet.common.drift.tables): Adult with a scheduled shift, and a
user's file windowed by its time column."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from privet.common.config import ConfigError, from_mapping
from privet.common.data import adult
from privet.common.drift import streams, tables

AGE_LOW, AGE_HIGH = adult.BOUNDS["age"]


def _adult(shift: str, **drift) -> object:
    keys = {"source": "adult", "shift": shift, "drift-round": 5, "rows-per-window": 2000,
            **drift}
    return from_mapping({"drift": keys, "rounds": 10, "num-clients": 3,
                         "clients-per-round": 3})


def _age(window: streams.Window) -> np.ndarray:
    return window.features[:, 0] * (AGE_HIGH - AGE_LOW) + AGE_LOW


def test_adult_windows_have_the_declared_shape_and_range():
    cfg = _adult("covariate")
    assert tables.feature_names(cfg)[0] == "age" and tables.num_classes(cfg) == 2
    train, test = tables.window(cfg, 0, 0), tables.window(cfg, 0, 0, "test")
    assert train.features.shape == (2000, len(tables.feature_names(cfg)))
    assert train.features.dtype == np.float32 and train.labels.dtype == np.int64
    assert len(test) == cfg.drift.test_rows
    assert train.features.min() >= 0.0 and train.features.max() <= 1.0
    again = tables.window(cfg, 0, 0)
    assert np.array_equal(again.features, train.features)  # reproducible
    assert not np.array_equal(tables.window(cfg, 1, 0).features, train.features)


def test_covariate_shift_ages_drifted_clients_only():
    cfg = _adult("covariate", **{"drift-clients": 1})
    first = streams.drift_window(cfg)
    hit = streams.drifted_clients(cfg)
    assert first == 4 and len(hit) == 1
    for client in range(cfg.num_clients):
        before = _age(tables.window(cfg, client, first - 1)).mean()
        after = _age(tables.window(cfg, client, first)).mean()
        if client in hit:
            assert after > before + 10
        else:
            assert abs(after - before) < 2


def test_gradual_drift_ramps_over_width_windows():
    cfg = _adult("covariate", width=4)
    ages = [_age(tables.window(cfg, 0, w)).mean() for w in range(10)]
    assert ages[3] < ages[4] < ages[5] < ages[6] < ages[7]
    assert abs(ages[7] - ages[9]) < 2


def test_prior_shift_balances_the_classes():
    cfg = _adult("prior")
    before = tables.window(cfg, 0, 3).labels.mean()
    after = tables.window(cfg, 0, 4).labels.mean()
    assert 0.18 < before < 0.32
    assert abs(after - 0.5) < 0.06


def test_concept_shift_flips_labels_of_the_young_only():
    drifted, calm = _adult("concept"), _adult("concept", **{"drift-round": 0})
    for w in (3, 4):
        a, b = tables.window(drifted, 0, w), tables.window(calm, 0, w)
        assert np.array_equal(a.features, b.features)
        young = _age(a) < tables.CONCEPT_AGE
        if w < 4:
            assert np.array_equal(a.labels, b.labels)
        else:
            assert np.array_equal(a.labels[young], 1 - b.labels[young])
            assert np.array_equal(a.labels[~young], b.labels[~young])


def test_encoding_has_no_data_dependent_parameters():
    cfg = _adult("covariate")
    bounds = adult.BOUNDS
    categories = {c: adult.CATEGORIES[c] for c in tables.ADULT_CATEGORICAL}
    row = {"age": 30.0, "fnlwgt": 2e6, "education-num": 9.0, "capital-gain": 0.0,
           "capital-loss": 0.0, "hours-per-week": 40.0, "workclass": "Private",
           "marital-status": "Divorced", "occupation": "Sales", "relationship": "Unmarried",
           "race": "White", "sex": "Female"}
    other = {**row, "age": 90.0, "fnlwgt": 1.0, "workclass": "Never-worked", "sex": "Male"}
    alone = tables._encode(pd.DataFrame([row]), bounds, categories)[0]
    mixed = tables._encode(pd.DataFrame([other, row, other]), bounds, categories)[1]
    assert np.array_equal(alone, mixed)
    assert alone[0] == pytest.approx((30 - 16) / 84) and alone[1] == 1.0  # fnlwgt clipped
    assert len(alone) == len(tables.feature_names(cfg))


def _csv(tmp_path, **data) -> object:
    days = pd.date_range("2024-01-01", periods=21, freq="D")
    rows = [{"when": day.strftime("%Y-%m-%d"), "x": float(i % 7),
             "colour": ("red", "blue")[i % 2], "y": "yes" if i % 3 else "no"}
            for i, day in enumerate(np.repeat(days, 10))]
    path = tmp_path / "events.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    keys = {"dataset": "csv", "path": str(path), "label": "y", "bounds": {"x": [0, 10]},
            "categories": {"colour": ["red", "blue"]}, **data}
    return from_mapping({"data": keys, "drift": {"source": "csv", "time-column": "when",
                                                 "window-length": "7D", "warmup-rounds": 2},
                         "rounds": 3, "num-clients": 3, "clients-per-round": 3})


def test_csv_windows_by_time_and_splits_each_row_once(tmp_path):
    cfg = _csv(tmp_path)
    assert tables.feature_names(cfg) == ("x", "colour=red", "colour=blue")
    assert tables.num_classes(cfg) == 2
    sizes = {(c, w, s): len(tables.window(cfg, c, w, s))
             for c in range(3) for w in range(4) for s in ("train", "test")}
    assert sum(sizes.values()) == 210
    for w in range(3):
        assert sum(n for (c, ww, s), n in sizes.items() if ww == w) == 70
        test = sum(n for (c, ww, s), n in sizes.items() if ww == w and s == "test")
        assert 10 <= test <= 18  # evaluation.holdout = 0.2 of each client-window
    assert all(n == 0 for (c, w, s), n in sizes.items() if w == 3)  # beyond the data
    _, _, _, _, windows, clients, test = tables._csv_table(cfg)
    assert len(windows) == 210 and set(clients) == {0, 1, 2}
    assert all((windows == w).sum() == 70 for w in range(3))


def test_csv_refusals_name_the_column_or_key(tmp_path):
    cfg = _csv(tmp_path)
    assert len(tables.window(from_mapping(_mapping(cfg)), 0, 0)) > 0  # the mapping works
    bad = [({"drift.time-column": "colour"}, "'colour'"), ({"drift.time-column": "wen"}, "'wen'"),
           ({"drift.window-length": "7 fortnights"}, "drift.window-length"),
           ({"data.bounds": "{}"}, "data.bounds.*'x'"),
           ({"data.categories": "{}"}, "'colour'"),
           ({"drift.time-column": "x"}, "'x' holds numbers")]
    for override, message in bad:
        changed = from_mapping(_mapping(cfg), override)
        with pytest.raises(ConfigError, match=message) as refused:
            tables.window(changed, 0, 0)
        assert "\n" not in str(refused.value)


def _mapping(cfg) -> dict:
    return {"data": {"dataset": "csv", "path": cfg.data.path, "label": "y",
                     "bounds": {"x": [0, 10]}, "categories": {"colour": ["red", "blue"]}},
            "drift": {"source": "csv", "time-column": "when", "window-length": "7D",
                      "warmup-rounds": 2},
            "rounds": 3, "num-clients": 3, "clients-per-round": 3}
