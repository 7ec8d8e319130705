"""Tabular preprocessing: cleaning, then a transform fitted on a client's own rows.

Cleaning is counted step by step so a person can see what happened to their data.
Encoding uses a vocabulary fixed by the dataset's schema, so every client produces
the same feature columns without ever seeing another client's rows. The fitted
transform is plain numbers (`FittedTransform`), so the federated fit
(`common.data.federated`) can build the same object from aggregate statistics.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from privet.common.config import PreprocessConfig
from privet.common.data.features import Features, layout
from privet.common.data.numbers import PLAIN, NumberFormat


@dataclass(frozen=True)
class CleaningReport:
    rows_in: int
    cells_trimmed: int
    missing_cells: int
    unparseable_numbers: int
    duplicates_dropped: int
    missing_label_dropped: int
    rows_out: int
    non_finite_numbers: int = 0  # inf, -inf, 1e309, nan in numeric columns: made missing

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def clean(frame: pd.DataFrame, *, numeric: list[str], label: str,
          missing_markers: list[str], drop_duplicates: bool = True,
          formats: dict[str, NumberFormat] | None = None
          ) -> tuple[pd.DataFrame, CleaningReport]:
    """Trim text, turn missing markers into NaN, parse numbers (each numeric column in its
    `formats` entry, else plainly), drop exact duplicates. Cells that are not numbers, and
    numbers that are not finite (inf, -inf, 1e309, nan), become missing, counted."""
    rows_in = len(frame)
    text = frame.astype("string")
    trimmed = text.apply(lambda col: col.str.strip())
    cells_trimmed = int((trimmed != text).fillna(False).to_numpy().sum())
    cleaned = trimmed.mask(trimmed.isin(missing_markers) | (trimmed == ""))
    missing_cells = int(cleaned.drop(columns=[label]).isna().to_numpy().sum())
    unparseable = non_finite = 0
    out = cleaned.astype(object).where(cleaned.notna(), np.nan)
    for col in numeric:
        parsed = (formats or {}).get(col, PLAIN).parse(cleaned[col])
        text_nan = cleaned[col].str.lower().isin(["nan", "+nan", "-nan"]).fillna(False)
        infinite = np.isinf(parsed.to_numpy(dtype=float))
        non_finite += int(infinite.sum() + text_nan.sum())
        unparseable += int((parsed.isna() & cleaned[col].notna() & ~text_nan).sum())
        out[col] = parsed.astype(float).mask(infinite)
    duplicates = 0
    if drop_duplicates:
        dup = out.duplicated(keep="first")
        duplicates = int(dup.sum())
        out = out[~dup]
    no_label = out[label].isna()
    out = out[~no_label].reset_index(drop=True)
    report = CleaningReport(rows_in, cells_trimmed, missing_cells, unparseable, duplicates,
                            int(no_label.sum()), len(out), non_finite)
    return out, report


@dataclass(frozen=True)
class Schema:
    """What every client knows before it sees a row: columns, vocabularies, classes.

    `bounds` are public [low, high] ranges of numeric columns; federated fitting clips to
    them so that one row's influence on the statistics, and so their noise, is bounded.
    `task` "regression": the label is a number (`classes` is ()); its number format, when
    not plain, is in `formats` under the label's name.
    """
    numeric: tuple[str, ...]
    categories: dict[str, tuple[str, ...]]
    label: str
    classes: tuple[str, ...]
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    formats: dict[str, NumberFormat] = field(default_factory=dict)  # see common.data.numbers
    task: str = "classification"  # or "regression" (train.task)

    @property
    def regression(self) -> bool:
        return self.task == "regression"

    @property
    def categorical(self) -> tuple[str, ...]:
        return tuple(self.categories)


OTHER = "other"


@dataclass(frozen=True)
class NumericStep:
    column: str
    clip_low: float   # -inf / inf when quantile clipping is off
    clip_high: float
    fill: float       # imputed for a missing value
    center: float
    scale: float


@dataclass(frozen=True)
class CategoricalStep:
    column: str
    vocabulary: tuple[str, ...]  # one feature each, then one for `other`
    fill: str | None             # imputed for a missing value; None = `other`


@dataclass(frozen=True)
class FittedTransform:
    """A fitted tabular transform as plain numbers, so it can travel as JSON.

    Applied in order: clip, impute, scale numbers; impute and one-hot categories (values
    outside the vocabulary go to `other`); keep the selected features; project (PCA).
    """
    numeric: tuple[NumericStep, ...]
    categorical: tuple[CategoricalStep, ...]
    keep: tuple[int, ...] | None = None
    pca_mean: tuple[float, ...] | None = None
    pca_components: tuple[tuple[float, ...], ...] | None = None

    def encoded_names(self) -> list[str]:
        names = [f"{s.column}" for s in self.numeric]
        for s in self.categorical:
            names += [f"{s.column}={v}" for v in s.vocabulary] + [f"{s.column}={OTHER}"]
        return names

    def feature_names(self) -> list[str]:
        names = self.encoded_names()
        if self.keep is not None:
            names = [names[i] for i in self.keep]
        if self.pca_components is not None:
            names = [f"pc{i + 1}" for i in range(len(self.pca_components))]
        return names

    def features(self) -> Features:
        """What each output column is (its structure only: no fitted number), for models
        that treat categorical columns apart (common.data.features)."""
        return layout([s.column for s in self.numeric],
                      [(s.column, s.vocabulary) for s in self.categorical], OTHER, self.keep,
                      len(self.pca_components) if self.pca_components is not None else 0)

    def encode(self, frame: pd.DataFrame) -> np.ndarray:
        """Clip, impute, scale and one-hot: the features before selection and PCA."""
        blocks = []
        for s in self.numeric:
            x = frame[s.column].to_numpy(dtype=float, na_value=np.nan)
            x = np.where(np.isnan(x), s.fill, np.clip(x, s.clip_low, s.clip_high))
            blocks.append(((x - s.center) / s.scale)[:, None])
        for s in self.categorical:
            values = frame[s.column].astype(object).where(frame[s.column].notna(), s.fill)
            codes = pd.Categorical(values, categories=list(s.vocabulary)).codes.astype(np.int64)
            codes[codes < 0] = len(s.vocabulary)  # unseen, or missing with no fill: other
            blocks.append(np.eye(len(s.vocabulary) + 1)[codes])
        return np.hstack(blocks) if blocks else np.zeros((len(frame), 0))

    def apply(self, frame: pd.DataFrame) -> np.ndarray:
        x = self.encode(frame)
        if self.keep is not None:
            x = x[:, list(self.keep)]
        if self.pca_components is not None:
            x = (x - np.asarray(self.pca_mean)) @ np.asarray(self.pca_components).T
        return x.astype(np.float32)

    def to_json(self) -> str:
        """Strict JSON: "no clipping" is written as null rather than ±Infinity."""
        data = asdict(self)
        for step in data["numeric"]:
            for key in ("clip_low", "clip_high"):
                step[key] = None if math.isinf(step[key]) else step[key]
        return json.dumps(data, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "FittedTransform":
        raw = json.loads(text)
        for step in raw["numeric"]:
            step["clip_low"] = -math.inf if step["clip_low"] is None else step["clip_low"]
            step["clip_high"] = math.inf if step["clip_high"] is None else step["clip_high"]
        return cls(numeric=tuple(NumericStep(**n) for n in raw["numeric"]),
                   categorical=tuple(CategoricalStep(c["column"], tuple(c["vocabulary"]),
                                                     c["fill"]) for c in raw["categorical"]),
                   keep=None if raw["keep"] is None else tuple(raw["keep"]),
                   pca_mean=None if raw["pca_mean"] is None else tuple(raw["pca_mean"]),
                   pca_components=None if raw["pca_components"] is None
                   else tuple(tuple(r) for r in raw["pca_components"]))


def schema_features(schema: Schema) -> Features:
    """The columns every transform fitted on one client's rows gives (a local fit keeps the
    schema's vocabularies and has no selection or PCA): known before any row is read."""
    return layout(schema.numeric, schema.categories.items(), OTHER)


def _scale(values: np.ndarray, scaling: str) -> tuple[float, float]:
    """(center, scale) as scikit-learn's scalers fit them; a zero scale becomes 1."""
    if scaling == "standard":
        center, scale = float(values.mean()), float(values.std())
    elif scaling == "minmax":
        center, scale = float(values.min()), float(values.max() - values.min())
    elif scaling == "robust":
        q25, q50, q75 = np.quantile(values, [0.25, 0.5, 0.75])
        center, scale = float(q50), float(q75 - q25)
    else:  # none; "bounds" is set by the caller from the declared bounds
        center, scale = 0.0, 1.0
    return center, (scale if scale > 1e-12 else 1.0)


def fit_local(frame: pd.DataFrame, schema: Schema, options: PreprocessConfig
              ) -> FittedTransform:
    """Fit on one client's own rows, exactly: for a client without sample-level DP, and for
    the server's own test rows (a DP-SGD client fits with `federated.fit_private`).

    The vocabulary is the schema's, so every client produces the same feature columns.
    """
    numeric = []
    for column in schema.numeric:
        raw = frame[column].to_numpy(dtype=float, na_value=np.nan)
        seen = raw[~np.isnan(raw)]
        low, high = -math.inf, math.inf
        if options.clip_quantile > 0 and len(seen):
            low, high = (float(v) for v in np.quantile(
                seen, [options.clip_quantile, 1 - options.clip_quantile]))
            seen = np.clip(seen, low, high)
        fill = _fill_value(seen, options)
        filled = np.where(np.isnan(raw), fill, np.clip(raw, low, high))
        center, scale = _scale(filled, options.scaling) if len(filled) else (0.0, 1.0)
        if options.scaling == "bounds":
            if column not in schema.bounds:
                raise ValueError(f"preprocess.scaling = \"bounds\": data.bounds has no range "
                                 f"for numeric column {column!r}")
            low_bound, high_bound = schema.bounds[column]
            center, scale = float(low_bound), float(high_bound - low_bound)
        numeric.append(NumericStep(column, low, high, fill, center, scale))
    categorical = []
    for column, vocabulary in schema.categories.items():
        fill = None
        if options.impute_categorical == "most-frequent":
            counts = frame[column].value_counts()
            counts = counts[counts.index.isin(vocabulary)]
            if len(counts):  # ties: the first in vocabulary order
                best = counts.max()
                fill = next(v for v in vocabulary if counts.get(v, 0) == best)
        categorical.append(CategoricalStep(column, tuple(vocabulary), fill))
    return FittedTransform(tuple(numeric), tuple(categorical))


def _fill_value(seen: np.ndarray, options: PreprocessConfig) -> float:
    if options.impute_numeric == "constant" or not len(seen):
        return float(options.fill_value)
    return float(np.median(seen) if options.impute_numeric == "median" else seen.mean())
