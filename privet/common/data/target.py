"""The regression target (`train.task = "regression"`): one number per row, on one scale.

Why public bounds. DP-SGD clips each row's gradient to C and the learning rate is tuned for
inputs and outputs of order one, so the target must be scaled; and the global model needs
one scale that every client and the server share. A scale fitted from the labels would
release something about them: an exact mean or range in the clear is outside every ε, and
a client's own statistics would give every client a different scale. So the target is
scaled by a range declared in public, `data.label-bounds = [low, high]` (Adult: the census
coding of the column, `common.data.adult.BOUNDS`), as `data.bounds` and
`preprocess.scaling = "bounds"` do for features: z = (y − mid) / half, mid = (low + high)/2,
half = (high − low)/2, so z ∈ [−1, 1] for y in the range. It needs no statistic of any row
and spends nothing. On the clients a label outside the range is clipped to it before scaling
(its loss, and the clipped training metrics, stay bounded); the server's test labels are
not clipped, so RMSE, MAE and R² measure the real values, in the label's own units
(`decode`).

What it costs: a range wider than the data shrinks the target (a tenfold too wide range
makes z span a tenth of [−1, 1]), which slows learning at a fixed `train.lr`; a too narrow
one clips the labels beyond it. A DP estimate of the range (as undeclared `data.bounds` get)
is not offered for the label yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from privet.common.config import ExperimentConfig, label_bounds
from privet.common.data.numbers import PLAIN, NumberFormat

# dirichlet and shards partitions split a continuous label by this many quantile bins
PARTITION_BINS = 10


@dataclass(frozen=True)
class TargetScale:
    """The public range [low, high] of the label and the affine map to [−1, 1]."""
    low: float
    high: float

    @property
    def center(self) -> float:
        return (self.low + self.high) / 2

    @property
    def half(self) -> float:
        return (self.high - self.low) / 2

    def encode(self, values: np.ndarray, clip: bool) -> np.ndarray:
        """Labels (N,) in their units -> float32 (N,) scaled targets; with `clip`, clipped to
        [low, high] first (then in [−1, 1])."""
        y = np.asarray(values, dtype=np.float64)
        if clip:
            y = np.clip(y, self.low, self.high)
        return ((y - self.center) / self.half).astype(np.float32)

    def decode(self, scaled) -> np.ndarray:
        """Scaled targets or predictions (N,) -> float64 (N,) in the label's units."""
        return self.center + self.half * np.asarray(scaled, dtype=np.float64)

    def as_dict(self) -> dict[str, float]:
        return {"low": self.low, "high": self.high, "center": self.center, "half": self.half}


def target_scale(cfg: ExperimentConfig) -> TargetScale | None:
    """The run's target scale, or None for classification: `data.label-bounds`, else (Adult)
    the census range of `data.label`. Raises ValueError when there is none (the config
    check makes csv/parquet declare it)."""
    if not cfg.regression:
        return None
    declared = label_bounds(cfg.data)
    if declared is not None:
        return TargetScale(*declared)
    if cfg.data.dataset == "adult":
        from privet.common.data import adult

        return TargetScale(*adult.BOUNDS[cfg.data.label])
    raise ValueError(f"data.label-bounds: required for train.task = \"regression\" on "
                     f"{cfg.data.dataset}")


def parse_target(values: pd.Series, where: str, label: str,
                 fmt: NumberFormat = PLAIN) -> np.ndarray:
    """A regression label column (cleaned: missing labels already dropped) as float64 (N,)
    numbers, read in the column's number format. Raises ValueError naming the first values
    that are not finite numbers."""
    text = pd.Series(values, dtype="string").str.strip()
    parsed = fmt.parse(text).to_numpy(dtype=float)
    bad = ~np.isfinite(parsed)
    if bad.any():
        shown = list(dict.fromkeys(text[bad].astype(str).tolist()))[:5]
        raise ValueError(f"{where}: label column {label!r}: {int(bad.sum())} value(s) that are "
                         f"not finite numbers, e.g. {shown}; train.task = \"regression\" needs "
                         "a number in every row's label")
    return parsed


def partition_bins(values: np.ndarray, bins: int = PARTITION_BINS) -> np.ndarray:
    """Quantile bin (int64, 0..bins-1) of each label, for the label-skew partitioners
    (dirichlet, shards), which split classes. Edges are the label's quantiles over the rows
    being split (simulation: one person holds them all; nothing is released); tied edges
    merge bins, so a label with few distinct values gets fewer, numbered 0..k-1 in the
    label's order."""
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return np.zeros(0, dtype=np.int64)
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    found = np.searchsorted(edges, values, side="right")
    return np.unique(found, return_inverse=True)[1].astype(np.int64)  # numbered 0..k-1
