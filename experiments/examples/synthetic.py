"""A seeded synthetic classification task for scale studies (experiments/configs/cross-device.toml).

`cross_device` returns 1,120,000 training rows and 20,000 test rows of 16 standard-normal
features, labelled by a fixed random linear rule with 10% of labels flipped (so the best
accuracy is about 0.9). The rows are split over clients by privet's `quantity` partition
(sizes ∝ rank^-0.5 above 10 rows each: with 100,000 clients, from 10 to 200 rows, most
near 10), so each client's DP-SGD sampling rate, and so its noise calibration, depends on
its own size. Generating all rows takes ~0.1 s and 72 MB per process; each simulation
worker calls it once.
"""

from __future__ import annotations

import numpy as np

SEED = 20261207
FEATURES = 16
TRAIN_ROWS = 1_120_000
TEST_ROWS = 20_000
FLIPPED = 0.1


def _rows(rng: np.random.Generator, weights: np.ndarray, count: int):
    x = rng.standard_normal((count, FEATURES), dtype=np.float32)
    y = (x @ weights > 0).astype(np.int64)
    flip = rng.random(count) < FLIPPED
    y[flip] = 1 - y[flip]
    return x, y


def cross_device(data=None) -> dict:
    """{"train": (features (1,120,000 × 16) float32, labels (1,120,000,) int64),
    "test": (features (20,000 × 16), labels (20,000,))}: the same arrays on every call."""
    rng = np.random.default_rng(SEED)
    weights = rng.standard_normal(FEATURES).astype(np.float32)
    return {"train": _rows(rng, weights, TRAIN_ROWS), "test": _rows(rng, weights, TEST_ROWS)}
