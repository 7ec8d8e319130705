"""Windowed tables for drift mode: Adult with a scheduled shift, or a user's file with a time
column (`drift.source` = "adult", "csv", "parquet"; `streams` delegates here).

Encoding is data-independent, so it spends no privacy budget and the monitoring histograms
keep fixed bins: a numeric column is scaled to [0, 1] by a declared range and clipped; a
categorical one is one-hot over a declared vocabulary (an unknown value encodes as all zeros).
Nothing is fitted on rows. The price: a badly declared range squashes a column, and a file's
numeric columns need `data.bounds` (and its text columns `data.categories`) before it runs.

Adult: every client owns a seeded, disjoint share of the cleaned train file (its "test" rows:
a share of the test file) and draws each window's rows from it with replacement. Before the
drift all rows are equally likely; a drifted client's windows from `streams.drift_window` on
mix in the shifted distribution (abruptly, or linearly over `drift.width` windows):
  covariate: row weight ∝ exp((age − 38)/12) · (1 + [hours-per-week > 45]), i.e. older
             people working long hours; P(label | features) is unchanged;
  prior:     classes reweighted so that >50K is half the rows (naturally about 0.25);
  concept:   the label of everyone under 40 is flipped; the features' mix is unchanged.
Resampling a finite pool repeats rows; a pool of 30,162 / num-clients rows is plenty for the
windows of a simulation. "education" (one-to-one with education-num) and "native-country" (41
values, 91 % one of them) are left out to keep 48 columns.

csv/parquet: one file (`data.path`); rows are windowed by `drift.time-column` into periods of
`drift.window-length` from the earliest timestamp; each row belongs to one client (a seeded
hash of its row number) and, within its client-window, to "test" (a seeded
`evaluation.holdout` share) or "train". Rows missing a label or feature are dropped.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from privet.common.config import ConfigError, ExperimentConfig, shaped
from privet.common.data import adult
from privet.common.drift import streams

ADULT_CATEGORICAL = ("workclass", "marital-status", "occupation", "relationship", "race", "sex")
POSITIVE = ">50K"
COVARIATE_AGE, COVARIATE_SCALE, LONG_HOURS = 38.0, 12.0, 45.0
CONCEPT_AGE = 40.0  # concept shift: labels flipped below this age
_SPLITS = {"train": 0, "test": 1}


def _split_code(split: str) -> int:
    if split not in _SPLITS:
        raise ValueError(f"split = {split!r}: expected 'train' or 'test'")
    return _SPLITS[split]


def _encode(frame: pd.DataFrame, bounds: dict, categories: dict) -> np.ndarray:
    """Rows -> float32 (n, d) in [0, 1]: each numeric column by its (low, high), then each
    categorical column one-hot over its list. Row by row: no statistic of the rows is used."""
    parts = [np.clip((frame[c].to_numpy(np.float64) - lo) / (hi - lo), 0.0, 1.0)[:, None]
             for c, (lo, hi) in bounds.items()]
    for column, values in categories.items():
        text = frame[column].astype(str).str.strip().to_numpy()
        parts.append(text[:, None] == np.asarray([str(v) for v in values], dtype=object)[None])
    return np.hstack(parts).astype(np.float32) if parts else np.zeros((len(frame), 0), np.float32)


def _names(bounds: dict, categories: dict) -> tuple[str, ...]:
    return tuple(bounds) + tuple(f"{c}={v}" for c, vs in categories.items() for v in vs)


def feature_names(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Names of the model's input columns, in order: numeric columns by name, then one
    `column=value` per category. Raises ConfigError (csv/parquet) as `window` does."""
    if cfg.drift.source == "adult":
        return _names(adult.BOUNDS, {c: adult.CATEGORIES[c] for c in ADULT_CATEGORICAL})
    return _csv_table(cfg)[0]


def num_classes(cfg: ExperimentConfig) -> int:
    """Classes of the label: 2 for Adult (0 = <=50K, 1 = >50K); csv/parquet: `data.classes`
    or the sorted distinct label values."""
    return 2 if cfg.drift.source == "adult" else len(_csv_table(cfg)[1])


# ---- Adult ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def _adult_table(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The cleaned file (rows with a missing value dropped): features, labels, age, hours."""
    frame = adult.load_raw(split).apply(lambda column: column.str.strip())
    frame = frame[~frame.isin(adult.MISSING_MARKERS + [""]).any(axis=1)]
    labels = frame[adult.LABEL].map(adult.normalise_label)
    unknown = sorted(set(labels) - set(adult.CLASSES))
    if unknown:
        raise ConfigError(f"{adult.data_file(split)}: unknown income label(s) {unknown[:3]}")
    frame = frame.assign(**{c: frame[c].astype(float) for c in adult.NUMERIC})
    features = _encode(frame, adult.BOUNDS, {c: adult.CATEGORIES[c] for c in ADULT_CATEGORICAL})
    return (features, (labels == POSITIVE).to_numpy(np.int64),
            frame["age"].to_numpy(np.float64), frame["hours-per-week"].to_numpy(np.float64))


@functools.lru_cache(maxsize=256)
def _adult_pool(seed: int, num_clients: int, client: int, split: str) -> np.ndarray:
    """Row numbers of the cleaned `split` file that client `client` owns (disjoint)."""
    rows = len(_adult_table(split)[1])
    order = np.random.default_rng(streams._seed(seed, _split_code(split), 0xADA1)).permutation(rows)
    return np.sort(np.array_split(order, num_clients)[client])


def drift_mix(cfg: ExperimentConfig, client: int, w: int) -> float:
    """How far client `client`'s window `w` has drifted: 0 (before, or a client the drift
    spares) to 1; a gradual drift (`drift.width` > 0) ramps 1/width per window from the drift
    window on, reaching 1 in its width-th window."""
    start = streams.drift_window(cfg)
    if start is None or w < start or client not in streams.drifted_clients(cfg):
        return 0.0
    width = cfg.drift.width
    return 1.0 if width <= 0 else min(1.0, (w - start + 1) / width)


def _shifted_weights(cfg: ExperimentConfig, age: np.ndarray, hours: np.ndarray,
                     labels: np.ndarray) -> np.ndarray:
    """Sampling probabilities of the pool's rows after the drift (sum 1)."""
    if cfg.drift.shift == "covariate":
        weight = np.exp((age - COVARIATE_AGE) / COVARIATE_SCALE) * (1.0 + (hours > LONG_HOURS))
    elif cfg.drift.shift == "prior":
        counts = np.bincount(labels, minlength=2).astype(np.float64)
        weight = np.where(counts[labels] > 0, 0.5 / np.maximum(counts[labels], 1.0), 0.0)
    else:  # concept: the rows' mix is unchanged
        weight = np.ones(len(labels))
    return weight / weight.sum()


def _adult_window(cfg: ExperimentConfig, client: int, w: int, split: str) -> streams.Window:
    features, labels, age, hours = _adult_table(split)
    pool = _adult_pool(cfg.seed, cfg.num_clients, client, split)
    n = cfg.drift.rows_per_window if split == "train" else cfg.drift.test_rows
    mix = drift_mix(cfg, client, w)
    p = np.full(len(pool), 1.0 / len(pool))
    if mix > 0 and cfg.drift.shift != "concept":
        p = (1.0 - mix) * p + mix * _shifted_weights(cfg, age[pool], hours[pool], labels[pool])
    seed = streams._seed(cfg.seed, client, w, _split_code(split), 0xADB2)
    rows = pool[np.random.default_rng(seed).choice(len(pool), size=n, p=p / p.sum())]
    y = labels[rows].copy()
    if mix > 0 and cfg.drift.shift == "concept":
        flip = (age[rows] < CONCEPT_AGE) & (
            np.random.default_rng(streams._seed(seed, 0xF11B)).random(n) < mix)
        y[flip] = 1 - y[flip]
    return streams.Window(features[rows], y)


# ---- csv / parquet ----------------------------------------------------------------------

def _hash(values: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of `values` xor `salt`: a seeded, well mixed uint64 per value."""
    x = values.astype(np.uint64) ^ np.uint64(salt)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _read(cfg: ExperimentConfig) -> tuple[pd.DataFrame, str]:
    path = Path(cfg.data.path).expanduser()
    if not cfg.data.path or not path.is_file():
        raise ConfigError(f"data.path = {cfg.data.path!r}: drift.source = "
                          f"\"{cfg.drift.source}\" reads one {cfg.drift.source} file; none there")
    try:
        frame = pd.read_csv(path) if cfg.drift.source == "csv" else pd.read_parquet(path)
    except Exception as err:  # pandas' and pyarrow's many parse errors
        raise ConfigError(f"{path}: cannot read as {cfg.drift.source}: "
                          + (str(err).splitlines() or [type(err).__name__])[0]) from None
    if frame.empty:
        raise ConfigError(f"{path}: no rows")
    for key, column in (("drift.time-column", cfg.drift.time_column),
                        ("data.label", cfg.data.label)):
        if not column or column not in frame.columns:
            raise ConfigError(f"{path}: {key} = {column!r} is not a column of the file "
                              f"(columns: {', '.join(map(str, frame.columns[:10]))})")
    return frame, str(path)


def _window_ids(times: pd.Series, length: str, where: str) -> np.ndarray:
    """Window (0-based) of each timestamp: consecutive periods of `length` from the first."""
    try:
        offset = pd.tseries.frequencies.to_offset(length)
    except (ValueError, TypeError):
        offset = None
    start = times.min()
    if offset is None or start + offset <= start:
        raise ConfigError(f"drift.window-length = {length!r}: expected a positive pandas "
                          "offset such as \"7D\", \"12h\" or \"1MS\"")
    edges, end = [start], times.max()
    while edges[-1] <= end:
        if len(edges) > 100_000:
            raise ConfigError(f"drift.window-length = {length!r}: over 100000 windows in "
                              f"{where}; choose a longer period")
        edges.append(edges[-1] + offset)
    return np.searchsorted(np.asarray(edges, dtype="datetime64[ns]"),
                           times.to_numpy(dtype="datetime64[ns]"), side="right") - 1


def _valid_range(pair) -> bool:
    try:
        return len(pair) == 2 and float(pair[0]) < float(pair[1])
    except (TypeError, ValueError):
        return False


def _parse_times(column: pd.Series) -> pd.Series | None:
    """Timestamps of `column`, or None when it does not parse; mixed UTC offsets (local time
    across a daylight-saving change) are converted to UTC."""
    for utc in (False, True):
        try:
            with warnings.catch_warnings():  # pandas warns when it falls back to dateutil
                warnings.simplefilter("ignore", UserWarning)
                times = pd.to_datetime(column, errors="raise", utc=utc)
        except (ValueError, TypeError, OverflowError):
            continue
        if pd.api.types.is_datetime64_any_dtype(times):
            return times
    return None


@functools.lru_cache(maxsize=4)
def _csv_table(cfg: ExperimentConfig) -> tuple[tuple[str, ...], tuple[str, ...], np.ndarray,
                                               np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The whole file, encoded: names, classes, features, labels, window, client, is-test."""
    frame, where = _read(cfg)
    time_col, label = cfg.drift.time_column, cfg.data.label
    if pd.api.types.is_numeric_dtype(frame[time_col]):
        raise ConfigError(f"{where}: drift.time-column {time_col!r} holds numbers, not dates; "
                          "write it as dates (e.g. 2024-01-31 or 2024-01-31T12:00)")
    times = _parse_times(frame[time_col])
    if times is None:
        raise ConfigError(f"{where}: drift.time-column {time_col!r} does not parse as dates "
                          f"(first value: {str(frame[time_col].iloc[0])[:40]!r})")
    if getattr(times.dt, "tz", None) is not None:
        times = times.dt.tz_convert("UTC").dt.tz_localize(None)
    if times.isna().any():
        raise ConfigError(f"{where}: drift.time-column {time_col!r} has "
                          f"{int(times.isna().sum())} empty value(s)")
    types, declared = shaped(cfg.data.column_types, {}), shaped(cfg.data.bounds, {})
    vocab = shaped(cfg.data.categories, {})
    bounds, categories = {}, {}
    for column in frame.columns:
        kind = types.get(column)
        if column in (time_col, label) or kind == "ignore":
            continue
        if kind == "categorical" or (kind is None and column in vocab):
            if column not in vocab:
                raise ConfigError(f"data.categories: no declared values for categorical column "
                                  f"{column!r} of {where}; declare them (drift mode encodes by "
                                  f"declared values) or set data.column-types.{column} = "
                                  "\"ignore\"")
            categories[column] = [str(v) for v in vocab[column]]
        elif kind == "numeric" or pd.api.types.is_numeric_dtype(frame[column]):
            pair = declared.get(column)
            if pair is None:
                raise ConfigError(f"data.bounds: no [low, high] range declared for numeric column "
                                  f"{column!r} of {where}; drift mode scales by declared ranges "
                                  "(fitting them on rows would spend privacy budget)")
            if not _valid_range(pair):
                raise ConfigError(f"data.bounds: {column} = {pair!r}: expected [low, high] with "
                                  "low < high")
            bounds[column] = (float(pair[0]), float(pair[1]))
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
        else:
            raise ConfigError(f"{where}: column {column!r} is not numeric: declare its values in "
                              "data.categories, or set data.column-types = "
                              f"{{ \"{column}\" = \"ignore\" }}")
    keep = frame[[label, *bounds, *categories]].notna().all(axis=1).to_numpy()
    found = list(frame.loc[keep, label].unique())
    try:
        found.sort()
    except TypeError:  # mixed types: by their text
        found.sort(key=str)
    classes = (tuple(map(str, shaped(cfg.data.classes, [])))
               or tuple(str(v).strip() for v in found))
    text = frame[label].astype(str).str.strip()
    unknown = keep & ~text.isin(classes).to_numpy()
    if unknown.any():
        raise ConfigError(f"data.classes: {where} has label {text[unknown].iloc[0]!r}, not one "
                          f"of {list(classes)}")
    rows = np.flatnonzero(keep)
    frame, times = frame.iloc[rows], times.iloc[rows]
    labels = pd.Categorical(text.iloc[rows], categories=list(classes)).codes.astype(np.int64)
    windows = _window_ids(times, cfg.drift.window_length, where)
    clients = (_hash(rows, streams._seed(cfg.seed, 0xC11E)) % np.uint64(cfg.num_clients))
    order = _hash(rows, streams._seed(cfg.seed, 0x7E57))
    test = np.zeros(len(rows), dtype=bool)
    groups = clients.astype(np.int64) * (int(windows.max(initial=0)) + 1) + windows
    ranked = np.lexsort((order, groups))  # by group, then by a seeded order within it
    starts = np.flatnonzero(np.r_[True, np.diff(groups[ranked]) != 0])
    sizes = np.diff(np.r_[starts, len(ranked)])
    for first, size in zip(starts, sizes):
        test[ranked[first:first + int(round(size * cfg.evaluation.holdout))]] = True
    return (_names(bounds, categories), classes, _encode(frame, bounds, categories), labels,
            windows, clients.astype(np.int64), test)


@functools.lru_cache(maxsize=256)
def _csv_client(cfg: ExperimentConfig, client: int, split: str
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _, _, features, labels, windows, clients, test = _csv_table(cfg)
    mine = (clients == client) & (test == (_split_code(split) == 1))
    return features[mine], labels[mine], windows[mine]


def window(cfg: ExperimentConfig, client: int, w: int, split: str = "train") -> streams.Window:
    """Client `client`'s rows of window `w` (0-based): the rows arriving then (`split`
    "train") or held-out rows of the same distribution ("test"). Features float32 (n, d) in
    [0, 1] (d = len(feature_names(cfg))), labels int64 (n,) class indices. Adult: n =
    drift.rows-per-window (train) or drift.test-rows (test); a file: the rows it has there, 0
    beyond its time range. Raises ConfigError (one line, naming the file or key) when the
    file, its time column, window length, bounds or categories cannot be used."""
    if not 0 <= client < cfg.num_clients:
        raise ValueError(f"client {client}: expected 0..{cfg.num_clients - 1}")
    if cfg.drift.source == "adult":
        return _adult_window(cfg, client, w, split)
    features, labels, windows = _csv_client(cfg, client, split)
    here = windows == w
    return streams.Window(features[here], labels[here])


def windows_in_data(cfg: ExperimentConfig) -> int | None:
    """How many windows a file's time range spans (None for Adult, which has no clock)."""
    if cfg.drift.source == "adult":
        return None
    return int(_csv_table(cfg)[4].max(initial=-1)) + 1
