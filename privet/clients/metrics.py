"""Training metrics a client may send with DP (`privacy.train-metrics = "noised"`).

After its local steps a client measures the round's model on its own training rows: the sum
of per-row cross-entropies, each clipped to [0, LOSS_BOUND] nats, and the count of rows it
classifies right. Adding or removing one row moves (loss sum / LOSS_BOUND, correct count)
by at most √2 in L2, so Gaussian noise of std σ·√2 on both makes a Gaussian mechanism of
noise multiplier σ (Dwork & Roth 2014, Thm A.1; accounted as dp-accounting's
GaussianDpEvent(σ)). One release per trained round, q = 1; σ is calibrated so that all of
the run's rounds together spend `privacy.train-metrics-epsilon`, charged to the ledger
before the DP-SGD steps are calibrated, like preprocessing.

Trade-off: the noised mean has std σ·√2/n (accuracy) and σ·√2·LOSS_BOUND/n (loss) for n
rows, so it reads well for clients with thousands of rows and poorly for tiny ones. The row
count n itself is sent in the clear (FedAvg weights by it) and listed as such.

Regression (`train.task = "regression"`): the loss alone, no accuracy. Each row's training
loss (mse or huber, common.losses) on the scaled target is clipped to [0, LOSS_BOUND]: 4 is
the squared error of a prediction at one end of the label's public range for a label at the
other (targets are clipped to [−1, 1] on the client, common.data.target), so mse is clipped
only for predictions outside the range. One row moves the clipped sum / LOSS_BOUND by at
most 1: L2 sensitivity 1, noise std σ, the same Gaussian mechanism of multiplier σ and the
same ε as for classification.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from privet.common.config import ExperimentConfig
from privet.common.evaluation import logits
from privet.common.losses import task_loss
from privet.common.privacy.accountants import calibrate_noise
from privet.common.privacy.ledger import Spend
from privet.common.privacy.randomness import Randomness

LOSS_BOUND = 4.0         # nats: a row counts as at most -ln(0.018) of loss (regression:
                         # squared half-ranges of the scaled target; see the module doc)
PURPOSE = "train-metrics"
STREAM = 0x3E7A1C5      # seeded draws of the metrics noise: (seed, round, client, this)
SENSITIVITY = math.sqrt(2.0)


def noised(cfg: ExperimentConfig, client_id: int) -> bool:
    """This client sends its training metrics noised (it trains with sample-level DP)."""
    return cfg.metrics_noised(client_id)


def noise_multiplier(cfg: ExperimentConfig) -> float:
    """σ of one round's release, calibrated so `cfg.rounds` releases spend
    `privacy.train-metrics-epsilon` at `privacy.delta`."""
    return calibrate_noise(cfg.privacy.train_metrics_epsilon, cfg.privacy.delta, 1.0,
                           cfg.rounds, cfg.privacy.accountant)


def planned(cfg: ExperimentConfig, client_id: int) -> tuple[Spend, ...]:
    """The run's planned metrics spend (every round, the worst case), or () when not noised."""
    if not noised(cfg, client_id):
        return ()
    return (Spend(noise_multiplier(cfg), 1.0, cfg.rounds, PURPOSE),)


def one_round(cfg: ExperimentConfig) -> Spend:
    """What one round's release spends."""
    return Spend(noise_multiplier(cfg), 1.0, 1, PURPOSE)


def clipped_sums(model: nn.Module, features: np.ndarray, labels: np.ndarray,
                 batch_size: int = 4096, loss: str = "cross-entropy") -> tuple[float, ...]:
    """(Σ min(loss, LOSS_BOUND) / LOSS_BOUND, Σ correct) over all rows; both move by at most
    1 when one row is added or removed. Regression (`loss` mse or huber): the first alone."""
    out, y = logits(model, features, batch_size), torch.from_numpy(labels)
    per_row = task_loss(loss, out, y, reduction="none")
    clipped = float(per_row.clamp(0.0, LOSS_BOUND).sum()) / LOSS_BOUND
    if loss != "cross-entropy":
        return (clipped,)
    return clipped, float((out.argmax(1) == y).sum())


def sensitivity(loss: str = "cross-entropy") -> float:
    """L2 sensitivity of `clipped_sums`: √2 (loss and correct count), 1 (regression)."""
    return SENSITIVITY if loss == "cross-entropy" else 1.0


def release(model: nn.Module, features: np.ndarray, labels: np.ndarray, sigma: float,
            randomness: Randomness, loss: str = "cross-entropy"
            ) -> tuple[float, float | None]:
    """(mean loss, accuracy) of `model` on these rows, with Gaussian noise of multiplier
    `sigma` on the clipped sums; post-processed into [0, LOSS_BOUND] and [0, 1]. The loss in
    nats, or (regression) in the scaled target's units, where the accuracy is None."""
    sums = np.array(clipped_sums(model, features, labels, loss=loss))
    noisy = sums + randomness.gaussian_numpy(len(sums), sigma * sensitivity(loss))
    rows = max(len(labels), 1)
    mean_loss = float(np.clip(noisy[0] * LOSS_BOUND / rows, 0.0, LOSS_BOUND))
    if len(sums) == 1:
        return mean_loss, None
    return mean_loss, float(np.clip(noisy[1] / rows, 0.0, 1.0))
