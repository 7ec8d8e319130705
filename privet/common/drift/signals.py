"""Monitoring signals: what a client measures on a new window before training on it, and how
the server combines the clients' noised releases.

A client evaluates the current global model on the window's rows (prequential evaluation:
test-then-train, Gama et al. 2013) and bins each feature into `bins` equal-width bins over its
declared range [0, 1]. It releases one vector

    [rows, errors, clipped loss sum / LOSS_CLIP, histogram of feature 1, ..., feature d]

with Gaussian noise. Adding or removing one row changes `rows`, `errors` and the scaled loss
by at most 1 each and one bin of each feature's histogram by 1, so the vector's L2
sensitivity is sqrt(3 + d) (`sensitivity`); the noise std is σ_m · sqrt(3 + d).

Each window's histograms are released once, with that window's monitoring. The reference
a later window is compared with is a window already released (the first monitored one, then
the window of the last retraining), so comparing with it (PSI) is post-processing and costs
nothing more.

PSI (population stability index, Σ (p − r)·ln(p / r) over bins) is the shift measure credit
scoring has used for decades; 0.1 is usually read as moderate and 0.25 as significant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

LOSS_CLIP = 4.0  # per-row cross-entropy is clipped to [0, 4] before summing (~ -ln 0.018)
PROPORTION_FLOOR = 1e-3  # a noised bin share below this counts as this (PSI's logarithm)


def sensitivity(num_features: int) -> float:
    """L2 sensitivity of the monitoring vector under adding or removing one row."""
    return math.sqrt(3 + num_features)


@torch.no_grad()
def client_statistics(model: nn.Module, features: np.ndarray, labels: np.ndarray,
                      bins: int, model_input=lambda x: x) -> np.ndarray:
    """The noise-free monitoring vector of one window: float64 (3 + d·bins,) =
    [rows, errors, Σ min(loss, LOSS_CLIP) / LOSS_CLIP, per-feature bin counts].
    `features` (n, d) in [0, 1] (values outside are clipped into the end bins)."""
    n, d = features.shape
    head = np.zeros(3)
    if n:
        model.eval()
        logits = model(torch.from_numpy(np.ascontiguousarray(model_input(features),
                                                             dtype=np.float32)))
        y = torch.from_numpy(labels)
        losses = nn.functional.cross_entropy(logits, y, reduction="none").clamp(0, LOSS_CLIP)
        head = np.array([n, float((logits.argmax(1) != y).sum()),
                         float(losses.sum()) / LOSS_CLIP])
    index = np.clip((features * bins).astype(np.int64), 0, bins - 1)
    hist = np.zeros((d, bins))
    for j in range(d):
        hist[j] = np.bincount(index[:, j], minlength=bins)[:bins]
    return np.concatenate([head, hist.ravel()])


@dataclass(frozen=True)
class WindowSignals:
    """The federated view of one window, from the sum of the clients' noised vectors."""
    rows: float             # noised row count (all clients)
    error_rate: float       # prequential error of the model it was monitored with, in [0, 1]
    loss: float             # mean clipped cross-entropy, in [0, LOSS_CLIP]
    proportions: np.ndarray  # (d, bins) each feature's bin shares, rows summing to 1

    def psi(self, reference: "WindowSignals") -> np.ndarray:
        """(d,) PSI of each feature against `reference` (post-processing of two releases)."""
        p, r = self.proportions, reference.proportions
        return np.sum((p - r) * np.log(p / r), axis=1)


def _shares(counts: np.ndarray, floor: float) -> np.ndarray:
    counts = np.maximum(counts, 0.0)
    total = counts.sum(axis=1, keepdims=True)
    shares = np.where(total > 0, counts / np.where(total > 0, total, 1), 1 / counts.shape[1])
    shares = np.maximum(shares, floor)
    return shares / shares.sum(axis=1, keepdims=True)


def combine(vectors: list[np.ndarray], num_features: int, bins: int, noise_std: float = 0.0
            ) -> WindowSignals:
    """Sum the clients' noised vectors (each (3 + d·bins,)) and read the window's signals.
    `noise_std`: the std of the noise on each coordinate of the sum (σ_m·Δ·√clients); a
    bin's share is floored at two of those over the rows, below which it cannot be told from
    noise (else a rare category's noised share, near 0, puts noise into PSI's logarithm).
    Raises ValueError when no vector came or their lengths differ."""
    if not vectors:
        raise ValueError("no client sent monitoring statistics")
    total = np.sum(np.stack(vectors), axis=0)
    if total.shape != (3 + num_features * bins,):
        raise ValueError(f"monitoring vector of length {total.shape[0]}, expected "
                         f"{3 + num_features * bins}")
    rows = max(float(total[0]), 1.0)
    return WindowSignals(rows=float(total[0]),
                         error_rate=float(np.clip(total[1] / rows, 0.0, 1.0)),
                         loss=float(np.clip(total[2] * LOSS_CLIP / rows, 0.0, LOSS_CLIP)),
                         proportions=_shares(total[3:].reshape(num_features, bins),
                                             max(PROPORTION_FLOOR, 2 * noise_std / rows)))
