"""Tabular preprocessing that a client fits on its own rows only.

Cleaning is counted step by step so a person can see what happened to their data.
Encoding uses a vocabulary fixed by the dataset's schema, so every client produces
the same feature columns without ever seeing another client's rows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler


@dataclass(frozen=True)
class CleaningReport:
    rows_in: int
    cells_trimmed: int
    missing_cells: int
    unparseable_numbers: int
    duplicates_dropped: int
    missing_label_dropped: int
    rows_out: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def clean(frame: pd.DataFrame, *, numeric: list[str], label: str,
          missing_markers: list[str], drop_duplicates: bool = True
          ) -> tuple[pd.DataFrame, CleaningReport]:
    """Trim text, turn missing markers into NaN, parse numbers, drop exact duplicates."""
    rows_in = len(frame)
    text = frame.astype("string")
    trimmed = text.apply(lambda col: col.str.strip())
    cells_trimmed = int((trimmed != text).fillna(False).to_numpy().sum())
    cleaned = trimmed.mask(trimmed.isin(missing_markers) | (trimmed == ""))
    missing_cells = int(cleaned.drop(columns=[label]).isna().to_numpy().sum())
    unparseable = 0
    out = cleaned.astype(object).where(cleaned.notna(), np.nan)
    for col in numeric:
        parsed = pd.to_numeric(cleaned[col], errors="coerce")
        unparseable += int((parsed.isna() & cleaned[col].notna()).sum())
        out[col] = parsed.astype(float)
    duplicates = 0
    if drop_duplicates:
        dup = out.duplicated(keep="first")
        duplicates = int(dup.sum())
        out = out[~dup]
    no_label = out[label].isna()
    out = out[~no_label].reset_index(drop=True)
    report = CleaningReport(rows_in, cells_trimmed, missing_cells, unparseable, duplicates,
                            int(no_label.sum()), len(out))
    return out, report


def make_transform(numeric: list[str], categories: dict[str, list[str]]) -> ColumnTransformer:
    """Median-impute and standardise numbers; impute and one-hot categories by schema."""
    cat_cols = list(categories)
    numeric_steps = make_pipeline(SimpleImputer(strategy="median", keep_empty_features=True),
                                  StandardScaler())
    categorical_steps = make_pipeline(
        SimpleImputer(strategy="most_frequent", keep_empty_features=True),
        OneHotEncoder(categories=[categories[c] for c in cat_cols], handle_unknown="ignore",
                      sparse_output=False, dtype=np.float32))
    return ColumnTransformer([("numeric", numeric_steps, numeric),
                              ("categorical", categorical_steps, cat_cols)])


def feature_names(transform: ColumnTransformer) -> list[str]:
    return list(transform.get_feature_names_out())
