"""Each preprocessing step against small hand-checked tables, and the federated fit
against the same fit on pooled rows."""

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from privet.common.config import CONFIGS_DIR, ConfigError, PreprocessConfig, load_config
from privet.common.data import federated
from privet.common.data.preprocess import FittedTransform, Schema, fit_local
from privet.common.privacy.randomness import SeededRandomness

SCHEMA = Schema(numeric=("age",), categories={"colour": ("red", "blue", "green")},
                label="y", classes=("no", "yes"), bounds={"age": (0.0, 100.0)})
ROWS = pd.DataFrame({"age": [10.0, 20.0, np.nan, 30.0, 40.0],
                     "colour": ["red", None, "red", "purple", "blue"],
                     "y": ["no", "yes", "no", "yes", "yes"]})
LABELS = np.array([0, 1, 0, 1, 1])


def options(**changes) -> PreprocessConfig:
    return dataclasses.replace(PreprocessConfig(), **changes)


def test_local_fit_standard_median_one_hot_with_other():
    t = fit_local(ROWS, SCHEMA, options())
    x = t.apply(ROWS)
    assert t.feature_names() == ["age", "colour=red", "colour=blue", "colour=green",
                                 "colour=other"]
    filled = np.array([10, 20, 25, 30, 40.0])  # median of 10, 20, 30, 40 = 25
    assert x[:, 0] == pytest.approx((filled - filled.mean()) / filled.std())
    assert x[:, 1:].tolist() == [[1, 0, 0, 0], [1, 0, 0, 0],  # missing -> most frequent
                                 [1, 0, 0, 0], [0, 0, 0, 1],  # unknown "purple" -> other
                                 [0, 1, 0, 0]]


@pytest.mark.parametrize("change, expected_age", [
    (dict(impute_numeric="mean"), [10, 20, 25, 30, 40]),
    (dict(impute_numeric="constant", fill_value=-1.0), [10, 20, -1, 30, 40]),
    (dict(scaling="minmax", impute_numeric="constant", fill_value=0.0),
     [0.25, 0.5, 0.0, 0.75, 1.0]),
    (dict(scaling="none", clip_quantile=0.25), [17.5, 20, 25, 30, 32.5]),
])
def test_local_fit_imputation_scaling_and_clipping(change, expected_age):
    t = fit_local(ROWS, SCHEMA, options(**change))
    age = t.apply(ROWS)[:, 0]
    if change.get("scaling", "standard") == "standard":
        e = np.array(expected_age, dtype=float)
        expected_age = (e - e.mean()) / e.std()
    assert age == pytest.approx(np.array(expected_age, dtype=float))


def test_robust_scaling_and_missing_category_to_other():
    t = fit_local(ROWS, SCHEMA, options(scaling="robust", impute_categorical="other"))
    filled = np.array([10, 20, 25, 30, 40.0])
    q25, q50, q75 = np.quantile(filled, [0.25, 0.5, 0.75])
    assert t.apply(ROWS)[:, 0] == pytest.approx((filled - q50) / (q75 - q25))
    assert t.apply(ROWS)[1, 1:].tolist() == [0, 0, 0, 1]


def test_transform_survives_json():
    t = fit_local(ROWS, SCHEMA, options(clip_quantile=0.1))
    again = FittedTransform.from_json(t.to_json())
    assert again == t and np.array_equal(again.apply(ROWS), t.apply(ROWS))


def test_feature_space_steps_need_a_federated_fit():
    for key in ("preprocess.select=\"variance\"", "preprocess.pca=2",
                "preprocess.max-categories=3"):
        with pytest.raises(ConfigError, match="needs preprocess.fit"):
            load_config(CONFIGS_DIR / "adult.toml", [key, "preprocess.fit=local"])
    # images have fixed pixel scaling: no tabular preprocessing to share
    digits = load_config(CONFIGS_DIR / "digits.toml", ["preprocess.fit=federated"])
    assert not digits.federated_preprocessing


@pytest.mark.parametrize("level", ["user", "both"])
def test_user_level_refuses_federated_statistics_in_one_line(level):
    """A participant's statistics cover all its rows: at user level they would need noise for
    a whole participant, which swamps them; refused, saying what to use instead."""
    with pytest.raises(ConfigError, match="refused.*preprocess.fit = \"local\"") as error:
        load_config(CONFIGS_DIR / "adult.toml", [f"privacy.level={level}",
                                                 "preprocess.fit=federated"])
    assert "\n" not in str(error.value)
    # the default (auto) is federated, and local at user level
    assert load_config(CONFIGS_DIR / "adult.toml").fit_mode == "federated"
    assert load_config(CONFIGS_DIR / "adult.toml", [f"privacy.level={level}"]).fit_mode == "local"


def _split(frame, labels, parts):
    return [(frame.iloc[p].reset_index(drop=True), labels[p]) for p in parts]


def _pooled_and_summed(opts, parts=((0, 1), (2, 3, 4))):
    summed = federated.sum_statistics([
        federated.client_statistics(f, y, SCHEMA, opts.bins)
        for f, y in _split(ROWS, LABELS, [list(p) for p in parts])])
    pooled = federated.client_statistics(ROWS, LABELS, SCHEMA, opts.bins)
    return summed, pooled


def test_federated_statistics_equal_pooled_statistics_without_noise():
    summed, pooled = _pooled_and_summed(options(bins=10))
    assert summed.keys() == pooled.keys()
    for name in pooled:
        assert summed[name] == pytest.approx(pooled[name])
    assert pooled["num:age:count"][0] == 4 and pooled["num:age:sum"][0] == pytest.approx(1.0)
    assert pooled["cat:colour:counts"].tolist() == [[2, 0, 0, 0], [0, 1, 0, 1]]


def _many_rows(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    age = rng.gamma(4.0, 8.0, n).clip(0, 100).round(1)
    age[rng.random(n) < 0.1] = np.nan
    colour = rng.choice(["red", "blue", "green", "purple"], n, p=[0.5, 0.3, 0.15, 0.05])
    colour = np.where(rng.random(n) < 0.05, None, colour)
    labels = rng.integers(0, 2, n)
    return pd.DataFrame({"age": age, "colour": colour, "y": labels}), labels


@pytest.mark.parametrize("change", [{}, dict(impute_numeric="mean"),
                                    dict(scaling="robust"), dict(scaling="minmax"),
                                    dict(clip_quantile=0.05)])
def test_federated_fit_matches_local_fit_on_pooled_rows(change):
    """Sums are exact; quantiles agree to about a histogram bin (0.5 with 200 bins of
    0..100), as they must for a fit that never sees a row."""
    opts = options(bins=200, **change)
    frame, labels = _many_rows()
    parts = np.array_split(np.arange(len(frame)), 5)
    summed = federated.sum_statistics([
        federated.client_statistics(f, y, SCHEMA, opts.bins)
        for f, y in _split(frame, labels, parts)])
    shared = federated.fit_federated(summed, SCHEMA, opts)
    local = fit_local(frame, SCHEMA, opts)
    assert shared.categorical == local.categorical
    a, b = shared.numeric[0], local.numeric[0]
    exact = change.get("impute_numeric") == "mean" and not change.get("clip_quantile")
    assert a.fill == pytest.approx(b.fill, abs=1e-9 if exact else 0.5)
    assert a.center == pytest.approx(b.center, abs=1e-9 if exact else 0.6)
    assert a.scale == pytest.approx(b.scale, rel=0.03)
    assert np.abs(shared.apply(frame) - local.apply(frame)).max() < 0.1


def test_one_row_moves_the_statistics_by_at_most_the_sensitivity():
    opts = options(bins=10)
    full = federated.client_statistics(ROWS, LABELS, SCHEMA, opts.bins)
    for row in range(len(ROWS)):
        keep = [i for i in range(len(ROWS)) if i != row]
        without = federated.client_statistics(ROWS.iloc[keep].reset_index(drop=True),
                                              LABELS[keep], SCHEMA, opts.bins)
        change = math.sqrt(sum(((full[k] - without[k]) ** 2).sum() for k in full))
        assert change <= federated.stats_sensitivity(SCHEMA) + 1e-9


def test_noise_has_the_stated_std():
    stats = {"a": np.zeros(20_000)}
    noisy = federated.add_noise(stats, 3.0, SeededRandomness(0))
    assert noisy["a"].std() == pytest.approx(3.0, rel=0.03)
    assert federated.add_noise(stats, 0.0, SeededRandomness(0))["a"].sum() == 0


def test_variance_and_mutual_information_selection():
    rng = np.random.default_rng(0)
    n = 2000
    labels = rng.integers(0, 2, n)
    frame = pd.DataFrame({
        "age": np.where(labels == 1, 70.0, 30.0) + rng.normal(0, 5, n),  # predictive
        "colour": np.where(rng.random(n) < 0.999, "red", "blue"),        # nearly constant
        "y": labels})
    summed = federated.client_statistics(frame, labels, SCHEMA, 50)
    by_variance = federated.fit_federated(summed, SCHEMA, options(
        fit="federated", select="variance", variance_threshold=0.01))
    assert by_variance.feature_names() == ["age"]
    by_mi = federated.fit_federated(summed, SCHEMA, options(
        fit="federated", select="mutual-info", top_k=1))
    assert by_mi.feature_names() == ["age"]
    assert by_mi.apply(frame).shape == (n, 1)


def test_top_categories_keep_the_most_frequent_and_pool_the_rest():
    summed, _ = _pooled_and_summed(options())
    t = federated.fit_federated(summed, SCHEMA, options(fit="federated", max_categories=1))
    assert t.categorical[0].vocabulary == ("red",)
    assert t.apply(ROWS)[:, 1:].tolist() == [[1, 0], [1, 0], [1, 0], [0, 1], [0, 1]]


def test_federated_pca_recovers_the_main_direction():
    rng = np.random.default_rng(1)
    direction = np.array([3.0, 4.0]) / 5
    x = rng.normal(0, 1, (5000, 1)) * direction * 3 + rng.normal(0, 0.1, (5000, 2))
    parts = np.array_split(x, 4)
    norm = federated.pca_clip_norm(10_000)  # 100: no row is clipped
    summed = federated.sum_statistics([federated.pca_statistics(p, norm) for p in parts])
    mean, components = federated.fit_pca(summed, norm, 1)
    assert abs(float(np.dot(components[0], direction))) == pytest.approx(1.0, abs=1e-3)
    assert np.allclose(mean, x.mean(axis=0), atol=1e-9)


def test_federated_bounds_are_required(tmp_path):
    schema = dataclasses.replace(SCHEMA, bounds={})
    with pytest.raises(ValueError, match="data.bounds.*age"):
        federated.client_statistics(ROWS, LABELS, schema, 10)


def test_noisy_sums_never_collapse_the_scale():
    """Adult's capital-loss: public bound 5,000, mostly 0. With the noise of ε = 0.3 on 14
    columns from 10 clients the variance from noisy sums can come out negative; the scale
    must then rest on the known noise level, not fall back to 1 (inputs in the thousands)."""
    rng = np.random.default_rng(3)
    n = 32_561
    loss = np.where(rng.random(n) < 0.05, rng.normal(1900, 300, n).clip(0, 5000), 0.0)
    frame = pd.DataFrame({"age": loss, "colour": ["red"] * n, "y": ["no"] * n})
    labels = np.zeros(n, dtype=np.int64)
    schema = dataclasses.replace(SCHEMA, bounds={"age": (0.0, 5000.0)})
    exact = federated.client_statistics(frame, labels, schema, 64)
    # σ = 11.2 (ε = 0.3, δ = 1e-5) × sqrt(1 + 4·6 + 8) (Adult's sensitivity) × sqrt(10 clients)
    std = 11.2 * math.sqrt(33) * math.sqrt(10)
    scales = []
    for seed in range(30):
        noisy = federated.add_noise(exact, std, SeededRandomness(seed))
        scales.append(federated.fit_federated(noisy, schema, options(fit="federated"),
                                              std).numeric[0].scale)
    assert 0.3 * loss.std() < min(scales) and max(scales) < 3 * loss.std()
