"""DP preprocessing statistics: a client's noised aggregates, fitted into a transform by the
server (federated) or by the client itself (local).

Federated: clients send noised aggregate statistics, never rows.

Each client computes, on its own cleaned rows: label counts; per numeric column the
count, sum and sum of squares of its values (clipped to public bounds) and a per-class
histogram; per categorical column per-class value counts. It adds Gaussian noise and
replies. The server sums the replies and fits one `FittedTransform`, so all clients
scale and encode alike. Optional PCA takes a second round of noised sums over the
shared features.

Privacy: statistics are stored in units of their per-row bound (sums divided by M,
sums of squares by M², M = the largest |bound|), so one row moves each component by at
most 1 and the L2 sensitivity is sqrt(number of components one row touches). The noise
is σ times that; each round is one Gaussian mechanism, recorded in the client's ledger
as (σ, q = 1, 1 step) and composed with its DP-SGD steps.

Local (`fit = "local"`, for a client that trains with DP-SGD): the client computes the same
statistics of its own training rows, adds the same kind of noise (one round, calibrated to
`preprocess.epsilon`) and fits its transform from them alone (`fit_private`): its encoding
of one row then depends on the other rows only through a DP release, which its ledger
records ("local-fit"). Transforms that need no statistics (declared bounds, constant fills,
missing categories to `other`: `needs_statistics`) are fitted without rows and cost nothing.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd

from privet.common.config import ExperimentConfig, PreprocessConfig
from privet.common.data.preprocess import CategoricalStep, FittedTransform, NumericStep, Schema
from privet.common.privacy.accountants import calibrate_noise
from privet.common.privacy.randomness import Randomness

Statistics = dict[str, np.ndarray]
PCA_SENSITIVITY = math.sqrt(3.0)  # count, sum and outer product, each of norm ≤ 1 per row


def missing_bounds(schema: Schema) -> tuple[str, ...]:
    """Numeric columns without a declared public range: their range is estimated first."""
    return tuple(c for c in schema.numeric if c not in schema.bounds)


def statistics_noise(cfg: ExperimentConfig, schema: Schema) -> tuple[float, int]:
    """(σ, rounds) of federated preprocessing: σ = 0 when it is off or noise-free (`inf`,
    or no client trains with DP). Rounds: the range of undeclared columns, the statistics,
    PCA. σ is calibrated so that all rounds together spend `preprocess.epsilon`."""
    pre = cfg.preprocess
    if not cfg.federated_preprocessing or math.isinf(pre.epsilon) or not cfg.private:
        return 0.0, 0
    rounds = 1 + bool(pre.pca) + bool(missing_bounds(schema))
    return calibrate_noise(pre.epsilon, cfg.privacy.delta, 1.0, rounds,
                           cfg.privacy.accountant), rounds


def local_fit_noise(cfg: ExperimentConfig, schema: Schema) -> tuple[float, int]:
    """(σ, rounds) of a client's own DP fit: the range of undeclared columns, then the
    statistics, together at `preprocess.epsilon`; σ = 0 when `preprocess.epsilon` is inf
    (exact statistics: the fit is then outside every ε)."""
    if math.isinf(cfg.preprocess.epsilon):
        return 0.0, 0
    rounds = 1 + bool(missing_bounds(schema))
    return calibrate_noise(cfg.preprocess.epsilon, cfg.privacy.delta, 1.0, rounds,
                           cfg.privacy.accountant), rounds


# Estimating a range with DP (undeclared data.bounds), after Google's differential-privacy
# library's ApproxBounds: each value falls in a bin of its sign and ⌊log2 |v|⌋; the noised
# bin counts are thresholded and the range is that of the outermost bins that pass. Values
# beyond the bins found are clipped, as with any declared range; a range found this way is
# a power of two at each end, so it is loose by up to 2x.
_EXPONENTS = (-10, 40)           # |v| below 2^-9 shares the smallest bin; above 2^41, the top
_WIDTH = _EXPONENTS[1] - _EXPONENTS[0] + 1
MAGNITUDE_BINS = 2 * _WIDTH + 1  # negatives (large to small), zero, positives (small to large)
BOUNDS_THRESHOLD = 4.0           # noise standard deviations a bin count must exceed


def _magnitude_bins(values: np.ndarray) -> np.ndarray:
    magnitude = np.abs(values)
    exponent = np.floor(np.log2(np.where(magnitude > 0, magnitude, 1.0)))
    k = np.clip(exponent, *_EXPONENTS).astype(np.int64) - _EXPONENTS[0]
    return np.where(values > 0, _WIDTH + 1 + k, np.where(values < 0, _WIDTH - 1 - k, _WIDTH))


def _bin_edges(index: int) -> tuple[float, float]:
    if index == _WIDTH:
        return 0.0, 0.0
    k = abs(index - _WIDTH) - 1 + _EXPONENTS[0]
    low = 0.0 if k == _EXPONENTS[0] else 2.0 ** k
    high = 2.0 ** (k + 1)
    return (low, high) if index > _WIDTH else (-high, -low)


def bounds_statistics(frame: pd.DataFrame, columns: tuple[str, ...]) -> Statistics:
    """Per column, how many present values fall in each magnitude bin: one row moves each
    column's counts by 1, so the L2 sensitivity is sqrt(len(columns))."""
    out = {}
    for column in columns:
        x = frame[column].to_numpy(dtype=float, na_value=np.nan)
        x = x[~np.isnan(x)]
        out[f"bounds:{column}"] = np.bincount(_magnitude_bins(x),
                                              minlength=MAGNITUDE_BINS).astype(float)
    return out


def bounds_sensitivity(columns: tuple[str, ...]) -> float:
    return math.sqrt(max(len(columns), 1))


def fit_bounds(stats: Statistics, columns: tuple[str, ...], noise_std: float
               ) -> dict[str, tuple[float, float]]:
    """The range of each column from its (noised) magnitude-bin counts: from the lowest to the
    highest bin whose count exceeds BOUNDS_THRESHOLD noise standard deviations (half a row
    when exact); when none does, the fullest bin. A function of the noised counts only."""
    threshold = BOUNDS_THRESHOLD * noise_std if noise_std > 0 else 0.5
    found = {}
    for column in columns:
        counts = stats[f"bounds:{column}"]
        passed = np.flatnonzero(counts > threshold)
        if not len(passed):
            passed = np.array([int(np.argmax(counts))])
        low, high = _bin_edges(int(passed.min()))[0], _bin_edges(int(passed.max()))[1]
        found[column] = (low, high if high > low else low + 1.0)
    return found


def with_bounds(schema: Schema, bounds: dict[str, tuple[float, float]]) -> Schema:
    return dataclasses.replace(schema, bounds={**schema.bounds, **bounds})


def needs_statistics(schema: Schema, options: PreprocessConfig) -> bool:
    """Whether fitting the transform needs statistics of the rows. Without: scaling from
    declared bounds (or none), constant numeric fill, no quantile clipping, and missing
    categories sent to `other` — a transform known before any row is read."""
    numeric = bool(schema.numeric) and (
        options.scaling not in ("bounds", "none") or options.impute_numeric != "constant"
        or options.clip_quantile > 0 or (options.scaling == "bounds"
                                         and bool(missing_bounds(schema))))
    categorical = bool(schema.categories) and options.impute_categorical == "most-frequent"
    return numeric or categorical


def fit_kind(cfg: ExperimentConfig, client_id: int, schema: Schema | None) -> str:
    """How a client's transform is fitted: "shared" (federated), "public" (no statistics
    needed), "private" (its own noised statistics, charged to its ledger), "exact" (its own
    rows as they are: a client without sample-level DP, or preprocess.epsilon = inf), or
    "none" (images)."""
    if schema is None:
        return "none"
    if cfg.federated_preprocessing:
        return "shared"
    if not needs_statistics(schema, cfg.preprocess):
        return "public"
    if cfg.client_private(client_id) and not math.isinf(cfg.preprocess.epsilon):
        return "private"
    return "exact"


def fit_public(schema: Schema, options: PreprocessConfig) -> FittedTransform:
    """The transform that needs no rows (see `needs_statistics`); raises ValueError when the
    options ask for statistics, or `bounds` scaling lacks a column's data.bounds."""
    if needs_statistics(schema, options):
        raise ValueError("fit_public: the preprocessing options need statistics of the rows")
    numeric = []
    for column in schema.numeric:
        center, scale = 0.0, 1.0
        clip = (-math.inf, math.inf)
        if options.scaling == "bounds":
            low, high = bounds_of(schema, column)
            center, scale, clip = low, high - low, (low, high)
        numeric.append(NumericStep(column, *clip, float(options.fill_value), center, scale))
    categorical = tuple(CategoricalStep(c, tuple(v), None) for c, v in schema.categories.items())
    return FittedTransform(tuple(numeric), categorical)


def fit_private(frame: pd.DataFrame, labels: np.ndarray, schema: Schema,
                options: PreprocessConfig, sigma: float, randomness: Randomness
                ) -> FittedTransform:
    """A client's own transform from its noised statistics: first the range of undeclared
    numeric columns (`bounds_statistics`), then `client_statistics`, each with Gaussian noise
    of std σ × its sensitivity: (ε, δ)-DP in each row for the σ `local_fit_noise` calibrates
    (one Gaussian mechanism per round, composed)."""
    missing = missing_bounds(schema)
    if missing:
        std = sigma * bounds_sensitivity(missing)
        noisy = add_noise(bounds_statistics(frame, missing), std, randomness)
        schema = with_bounds(schema, fit_bounds(noisy, missing, std))
    std = sigma * stats_sensitivity(schema)
    noisy = add_noise(client_statistics(frame, labels, schema, options.bins), std, randomness)
    return fit_federated(noisy, schema, options, std)


def bounds_of(schema: Schema, column: str) -> tuple[float, float]:
    try:
        low, high = schema.bounds[column]
    except KeyError:
        raise ValueError(
            f"data.bounds: no public range for numeric column {column!r}; DP preprocessing "
            f"statistics clip to one, e.g. {{ {column} = [0, 100] }}") from None
    if not high > low:
        raise ValueError(f"data.bounds: {column} = [{low}, {high}]: expected low < high")
    return float(low), float(high)


def _unit(schema: Schema, column: str) -> float:
    low, high = bounds_of(schema, column)
    return max(abs(low), abs(high)) or 1.0


def stats_sensitivity(schema: Schema) -> float:
    """L2 bound on one row's change to the (normalised) statistics."""
    return math.sqrt(1 + 4 * len(schema.numeric) + len(schema.categories))


def _bin_index(values: np.ndarray, low: float, high: float, bins: int) -> np.ndarray:
    index = np.floor((values - low) / (high - low) * bins).astype(np.int64)
    return np.clip(index, 0, bins - 1)


def _codes(frame: pd.DataFrame, column: str, vocabulary: tuple[str, ...]) -> np.ndarray:
    """Vocabulary index per row; unknown values -> len(vocabulary) (`other`), missing -> -1."""
    codes = pd.Categorical(frame[column], categories=list(vocabulary)).codes.astype(np.int64)
    codes[(codes < 0) & frame[column].notna().to_numpy()] = len(vocabulary)
    return codes


def client_statistics(frame: pd.DataFrame, labels: np.ndarray, schema: Schema, bins: int
                      ) -> Statistics:
    """Exact statistics of one client's cleaned rows (normalised units, see module doc).
    Regression: one "class" for every row (the label's values are not used: its scale is
    public, common.data.target), so `label` is the row count."""
    if schema.regression:
        labels = np.zeros(len(frame), dtype=np.int64)
    k = len(schema.classes) or 1
    stats: Statistics = {"label": np.bincount(labels, minlength=k).astype(float)}
    for column in schema.numeric:
        low, high = bounds_of(schema, column)
        unit = _unit(schema, column)
        x = frame[column].to_numpy(dtype=float, na_value=np.nan)
        present = ~np.isnan(x)
        clipped = np.clip(x[present], low, high)
        hist = np.zeros((k, bins))
        np.add.at(hist, (labels[present], _bin_index(clipped, low, high, bins)), 1.0)
        stats[f"num:{column}:count"] = np.array([present.sum()], dtype=float)
        stats[f"num:{column}:sum"] = np.array([clipped.sum() / unit])
        stats[f"num:{column}:sumsq"] = np.array([(clipped ** 2).sum() / unit ** 2])
        stats[f"num:{column}:hist"] = hist
    for column, vocabulary in schema.categories.items():
        codes = _codes(frame, column, vocabulary)
        counts = np.zeros((k, len(vocabulary) + 1))
        seen = codes >= 0
        np.add.at(counts, (labels[seen], codes[seen]), 1.0)
        stats[f"cat:{column}:counts"] = counts
    return stats


def add_noise(stats: Statistics, std: float, randomness: Randomness) -> Statistics:
    """Gaussian noise of std `std` on every component, drawn in the statistics' order."""
    if std == 0:
        return {name: value.copy() for name, value in stats.items()}
    return {name: value + randomness.gaussian_numpy(value.shape, std)
            for name, value in stats.items()}


def sum_statistics(replies: list[Statistics]) -> Statistics:
    if not replies:
        raise ValueError("no client sent statistics")
    names = set(replies[0])
    for reply in replies[1:]:
        if set(reply) != names:
            raise ValueError(f"clients sent different statistics: {sorted(names ^ set(reply))}")
    return {name: np.sum([r[name] for r in replies], axis=0) for name in sorted(names)}


def _quantile(hist: np.ndarray, edges: np.ndarray, q: float) -> float:
    """Quantile of a histogram, interpolating linearly inside the bin (noise clipped at 0)."""
    counts = np.clip(hist, 0, None)
    total = counts.sum()
    if total <= 0:
        return float((edges[0] + edges[-1]) / 2)
    cumulative = np.cumsum(counts)
    i = int(np.searchsorted(cumulative, q * total, side="left"))
    i = min(i, len(counts) - 1)
    before = cumulative[i - 1] if i else 0.0
    inside = (q * total - before) / counts[i] if counts[i] > 0 else 0.5
    return float(edges[i] + np.clip(inside, 0, 1) * (edges[i + 1] - edges[i]))


def _moments(stats: Statistics, schema: Schema, column: str, noise_std: float,
             clip: tuple[float, float] = (-math.inf, math.inf)) -> tuple[float, float, float]:
    """(mean, mean of squares, noise std of the variance) of a column's present values.

    From the exact sums, or from the histogram when quantile clipping changes the values.
    The noise on the sums is known to the server (`noise_std` per normalised component);
    with a wide public bound it can exceed a small spread (Adult's capital-loss: bound
    5,000, mostly 0), so the caller floors the variance at it rather than at 0.
    """
    low, high = bounds_of(schema, column)
    unit = _unit(schema, column)
    count = max(float(stats[f"num:{column}:count"][0]), 1.0)
    mean = float(stats[f"num:{column}:sum"][0]) * unit / count
    second = float(stats[f"num:{column}:sumsq"][0]) * unit ** 2 / count
    error = noise_std * unit ** 2 / count + 2 * abs(mean) * noise_std * unit / count
    if clip != (-math.inf, math.inf):
        hist = np.clip(stats[f"num:{column}:hist"].sum(axis=0), 0, None)
        edges = np.linspace(low, high, len(hist) + 1)  # the clients' bins
        values = np.clip((edges[:-1] + edges[1:]) / 2, *clip)
        weight = max(hist.sum(), 1e-12)
        return ((hist * values).sum() / weight, (hist * values ** 2).sum() / weight, error)
    return mean, second, error


def _numeric_step(stats: Statistics, schema: Schema, column: str, rows: float,
                  options: PreprocessConfig, noise_std: float = 0.0) -> NumericStep:
    low, high = bounds_of(schema, column)
    hist = np.clip(stats[f"num:{column}:hist"].sum(axis=0), 0, None)
    edges = np.linspace(low, high, len(hist) + 1)
    count = max(float(stats[f"num:{column}:count"][0]), 0.0)
    clip_low, clip_high = -math.inf, math.inf
    if options.clip_quantile > 0:
        clip_low = _quantile(hist, edges, options.clip_quantile)
        clip_high = _quantile(hist, edges, 1 - options.clip_quantile)
    mean, second, error = _moments(stats, schema, column, noise_std, (clip_low, clip_high))
    mean = float(np.clip(mean, low, high))
    if options.impute_numeric == "constant" or count < 1:
        fill = float(options.fill_value)
    elif options.impute_numeric == "median":
        fill = float(np.clip(_quantile(hist, edges, 0.5), clip_low, clip_high))
    else:
        fill = mean
    # moments and quantiles after imputation, as a scaler fitted on the filled column sees
    missing = max(rows - count, 0.0)
    total = max(count + missing, 1.0)
    filled_mean = (count * mean + missing * fill) / total
    filled_second = (count * second + missing * fill ** 2) / total
    filled_hist = hist.copy()
    filled_hist[_bin_index(np.array([fill]), low, high, len(hist))[0]] += missing
    if options.scaling == "standard":
        center = filled_mean
        scale = math.sqrt(max(filled_second - filled_mean ** 2, error))
    elif options.scaling == "minmax":  # exact extremes are not private: 0.1% / 99.9% quantiles
        center = _quantile(filled_hist, edges, 0.001)
        scale = _quantile(filled_hist, edges, 0.999) - center
    elif options.scaling == "robust":
        q25, q50, q75 = (_quantile(filled_hist, edges, q) for q in (0.25, 0.5, 0.75))
        center, scale = q50, q75 - q25
    elif options.scaling == "bounds":
        center, scale = low, high - low
    else:
        center, scale = 0.0, 1.0
    # the statistics saw values clipped to [low, high]: the transform clips alike, so a
    # value beyond a range (declared, or estimated with DP) is encoded as the fit saw it
    return NumericStep(column, max(clip_low, low), min(clip_high, high), fill, float(center),
                       float(scale) if scale > 1e-12 else 1.0)


def fit_federated(stats: Statistics, schema: Schema, options: PreprocessConfig,
                  noise_std: float = 0.0) -> FittedTransform:
    """One shared transform from the summed statistics of all clients; `noise_std` is the
    std of the noise on each normalised component of the sum (0 when exact)."""
    rows = max(float(stats["label"].sum()), 1.0)
    numeric = tuple(_numeric_step(stats, schema, c, rows, options, noise_std)
                    for c in schema.numeric)
    categorical = []
    for column, vocabulary in schema.categories.items():
        totals = np.clip(stats[f"cat:{column}:counts"].sum(axis=0)[:-1], 0, None)
        order = sorted(range(len(vocabulary)), key=lambda i: (-totals[i], i))
        kept = vocabulary
        if options.max_categories:
            kept = tuple(vocabulary[i] for i in sorted(order[:options.max_categories]))
        fill = None
        if options.impute_categorical == "most-frequent" and order and totals[order[0]] > 0:
            fill = vocabulary[order[0]]
        categorical.append(CategoricalStep(column, tuple(kept), fill))
    transform = FittedTransform(numeric, tuple(categorical))
    if options.select != "none":
        keep = _select(stats, schema, transform, rows, options, noise_std)
        transform = FittedTransform(numeric, tuple(categorical), keep=keep)
    return transform


def _feature_tables(stats: Statistics, schema: Schema, transform: FittedTransform,
                    rows: float, options: PreprocessConfig, noise_std: float
                    ) -> list[tuple[float, np.ndarray]]:
    """Per encoded feature: (variance after the transform, class × value contingency)."""
    tables = []
    for step in transform.numeric:
        hist = np.clip(stats[f"num:{step.column}:hist"], 0, None)
        mean, second, error = _moments(stats, schema, step.column, noise_std,
                                       (step.clip_low, step.clip_high))
        variance = max(second - mean ** 2, error) / step.scale ** 2
        tables.append((variance, hist))
    for step, (column, vocabulary) in zip(transform.categorical, schema.categories.items()):
        counts = np.clip(stats[f"cat:{column}:counts"], 0, None)  # class × (vocab + other)
        per_class = counts.sum(axis=1)
        index = {v: i for i, v in enumerate(vocabulary)}
        kept = [index[v] for v in step.vocabulary]
        columns = [counts[:, i] for i in kept]
        columns.append(per_class - np.sum(columns, axis=0) if columns else per_class)
        missing = max(rows - per_class.sum(), 0.0)  # imputed: to the fill value, else other
        filled = (step.vocabulary.index(step.fill) if step.fill in step.vocabulary
                  else len(columns) - 1)
        for j, hits in enumerate(columns):
            share = (hits.sum() + (missing if j == filled else 0.0)) / rows
            share = min(max(share, 0.0), 1.0)
            tables.append((share * (1 - share), np.stack([hits, per_class - hits], axis=1)))
    return tables


def mutual_information(table: np.ndarray) -> float:
    """MI (nats) between the class (rows) and the value (columns) of a count table."""
    counts = np.clip(np.asarray(table, dtype=float), 0, None)
    total = counts.sum()
    if total <= 0:
        return 0.0
    joint = counts / total
    outer = joint.sum(axis=1, keepdims=True) * joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    return float((joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])).sum())


def _select(stats: Statistics, schema: Schema, transform: FittedTransform, rows: float,
            options: PreprocessConfig, noise_std: float) -> tuple[int, ...]:
    tables = _feature_tables(stats, schema, transform, rows, options, noise_std)
    if options.select == "variance":
        keep = [i for i, (variance, _) in enumerate(tables)
                if variance > options.variance_threshold]
    else:
        scores = [mutual_information(table) for _, table in tables]
        keep = sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:options.top_k])
    if not keep:
        raise ValueError(f"preprocess.select = {options.select!r} kept no feature; lower "
                         "preprocess.variance-threshold")
    return tuple(keep)


def pca_clip_norm(num_features: int) -> float:
    """Rows are clipped to this L2 norm: standardised numbers and one-hots of d features
    have norms around sqrt(d)."""
    return math.sqrt(max(num_features, 1))


def pca_statistics(features: np.ndarray, clip_norm: float) -> Statistics:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    z = features * np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12)) / clip_norm
    return {"count": np.array([float(len(z))]), "sum": z.sum(axis=0), "outer": z.T @ z}


def fit_pca(stats: Statistics, clip_norm: float, components: int
            ) -> tuple[tuple[float, ...], tuple[tuple[float, ...], ...]]:
    """(mean, components) from summed second moments; eigenvector signs fixed for determinism."""
    d = len(stats["sum"])
    if components > d:
        raise ValueError(f"preprocess.pca = {components}: only {d} features to project")
    n = max(float(stats["count"][0]), 1.0)
    mean = stats["sum"] * clip_norm / n
    outer = (stats["outer"] + stats["outer"].T) / 2 * clip_norm ** 2 / n
    values, vectors = np.linalg.eigh(outer - np.outer(mean, mean))
    top = vectors[:, np.argsort(values)[::-1][:components]].T
    top *= np.sign(top[np.arange(len(top)), np.abs(top).argmax(axis=1)])[:, None]
    return tuple(map(float, mean)), tuple(tuple(map(float, row)) for row in top)
