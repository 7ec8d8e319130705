"""Evaluation shared by the server (test set) and the clients (their own rows)."""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def logits(model: nn.Module, features: np.ndarray, batch_size: int = 4096) -> torch.Tensor:
    """The model's outputs (N, classes) for `features` (N, ...), in eval mode, in batches."""
    model.eval()
    x_all = torch.from_numpy(features)
    return torch.cat([model(x_all[i:i + batch_size]) for i in range(0, len(x_all), batch_size)])


def _loss_and_accuracy(out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    loss = float(nn.functional.cross_entropy(out, y, reduction="sum")) / len(y)
    return loss, int((out.argmax(1) == y).sum()) / len(y)


def evaluate(model: nn.Module, features: np.ndarray, labels: np.ndarray,
             batch_size: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy) in batched passes."""
    return _loss_and_accuracy(logits(model, features, batch_size), torch.from_numpy(labels))


@dataclass(frozen=True)
class Scores:
    """A classifier's scores on labelled rows. Fractions in [0, 1]; loss in nats;
    `majority` is the accuracy of always answering the most frequent class of these rows
    (the baseline a model must beat on imbalanced data, e.g. 0.76 on Adult); `auc` is ROC
    AUC (binary: of the second class; more classes: one-vs-rest, macro), NaN when a class
    is absent from the rows."""
    loss: float
    accuracy: float
    balanced_accuracy: float = math.nan
    macro_f1: float = math.nan
    auc: float = math.nan
    majority: float = math.nan

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score(model: nn.Module, features: np.ndarray, labels: np.ndarray, num_classes: int,
          batch_size: int = 4096) -> Scores:
    """Scores of `model` (logits (B, num_classes)) on `features` (N, ...) with integer
    `labels` (N,), by scikit-learn's metrics (balanced_accuracy_score, f1_score macro,
    roc_auc_score)."""
    from sklearn import metrics

    out = logits(model, features, batch_size)
    loss, accuracy = _loss_and_accuracy(out, torch.from_numpy(labels))
    predicted = out.argmax(1).numpy()
    probabilities = torch.softmax(out.double(), 1).numpy()
    classes = list(range(num_classes))
    counts = np.bincount(labels, minlength=num_classes)
    with warnings.catch_warnings():  # a class absent from the rows: NaN says it
        warnings.simplefilter("ignore")
        try:
            auc = float(metrics.roc_auc_score(labels, probabilities[:, 1]) if num_classes == 2
                        else metrics.roc_auc_score(labels, probabilities, multi_class="ovr",
                                                   labels=classes))
        except ValueError:
            auc = math.nan
        return Scores(loss=loss, accuracy=accuracy,
                      balanced_accuracy=float(metrics.balanced_accuracy_score(labels,
                                                                              predicted)),
                      macro_f1=float(metrics.f1_score(labels, predicted, average="macro",
                                                      labels=classes, zero_division=0)),
                      auc=auc, majority=float(counts.max() / counts.sum()))
