"""Evaluation shared by the server (test set) and the clients (their own rows): a
classifier's `Scores`, a regression model's `RegressionScores`.

The model's forward passes run on a device (`train.device`, resolved by common.device): the
model and each batch move there, the outputs come back to the CPU, and the model goes back
to where it was; the scores are computed on the CPU as before."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from privet.common.losses import task_loss


@torch.no_grad()
def logits(model: nn.Module, features: np.ndarray, batch_size: int = 4096,
           device: str | torch.device = "cpu") -> torch.Tensor:
    """The model's outputs (N, classes) for `features` (N, ...), in eval mode, in batches
    of `batch_size` rows computed on `device` (a torch device or its name), returned on the
    CPU (regression: (N, 1), the scaled prediction). `model` is back on the device it was
    on when this returns."""
    model.eval()
    device = torch.device(device)
    home = next(model.parameters(), torch.empty(0)).device
    x_all = torch.from_numpy(features)
    model.to(device)
    try:
        return torch.cat([model(x_all[i:i + batch_size].to(device)).cpu()
                          for i in range(0, len(x_all), batch_size)])
    finally:
        model.to(home)


def _loss_and_accuracy(out: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    loss = float(nn.functional.cross_entropy(out, y, reduction="sum")) / len(y)
    return loss, int((out.argmax(1) == y).sum()) / len(y)


def evaluate(model: nn.Module, features: np.ndarray, labels: np.ndarray,
             batch_size: int = 4096, loss: str = "cross-entropy",
             device: str | torch.device = "cpu") -> tuple[float, float]:
    """(mean cross-entropy in nats, accuracy) in batched passes on `device` (`logits`);
    with a regression `loss` (mse, huber: common.losses), (its mean on the scaled target,
    NaN)."""
    out, y = logits(model, features, batch_size, device), torch.from_numpy(labels)
    if loss == "cross-entropy":
        return _loss_and_accuracy(out, y)
    return float(task_loss(loss, out, y, reduction="sum")) / max(len(y), 1), math.nan


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
          batch_size: int = 4096, device: str | torch.device = "cpu") -> Scores:
    """Scores of `model` (logits (B, num_classes)) on `features` (N, ...) with integer
    `labels` (N,): scikit-learn's balanced_accuracy_score, f1_score (macro over every
    class, zero_division=0) and roc_auc_score (binary; one-vs-rest macro), computed in
    numpy (`balanced_accuracy`, `macro_f1`, `roc_auc`: tests hold them to scikit-learn's
    to 1e-12; scikit-learn's took ~12 ms a round, more than a small round's training);
    the forward passes on `device` (`logits`)."""
    out = logits(model, features, batch_size, device)
    loss, accuracy = _loss_and_accuracy(out, torch.from_numpy(labels))
    predicted = out.argmax(1).numpy()
    probabilities = torch.softmax(out.double(), 1).numpy()
    counts = np.bincount(labels, minlength=num_classes)
    return Scores(loss=loss, accuracy=accuracy,
                  balanced_accuracy=balanced_accuracy(labels, predicted, num_classes),
                  macro_f1=macro_f1(labels, predicted, num_classes),
                  auc=roc_auc(labels, probabilities), majority=float(counts.max() / counts.sum()))


def _confusion(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: row = true class, column = predicted class."""
    return np.bincount(labels * num_classes + predicted,
                       minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def balanced_accuracy(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Mean recall over the classes present in `labels` (scikit-learn's
    balanced_accuracy_score); labels and predictions are class indices (N,)."""
    confusion = _confusion(labels, predicted, num_classes)
    support = confusion.sum(1)
    present = support > 0
    return float(np.mean(np.diag(confusion)[present] / support[present]))


def macro_f1(labels: np.ndarray, predicted: np.ndarray, num_classes: int) -> float:
    """Unweighted mean over all `num_classes` classes of F1 = 2·TP / (2·TP + FP + FN), 0
    where that is 0/0 (scikit-learn's f1_score, average="macro", zero_division=0)."""
    confusion = _confusion(labels, predicted, num_classes)
    tp = np.diag(confusion).astype(float)
    denominator = 2 * tp + (confusion.sum(0) - tp) + (confusion.sum(1) - tp)
    f1 = np.divide(2 * tp, denominator, out=np.zeros(num_classes), where=denominator > 0)
    return float(f1.mean())


def _binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of `scores` for the boolean `positive` (N,): the Mann-Whitney statistic with
    tied scores sharing their average rank (equal to the area under the ROC curve that
    scikit-learn integrates); NaN when one side is empty."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    unique, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # ranks 1..N; tied values share the mean of the ranks they span
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = average_rank[inverse][positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """ROC AUC of `probabilities` (N, C) for integer `labels` (N,): two classes, of the
    second class's probability; more, one-vs-rest averaged over the C classes (scikit-learn's
    roc_auc_score, multi_class="ovr", average="macro"); NaN when a class is absent."""
    classes = probabilities.shape[1]
    if classes == 2:
        return _binary_auc(labels == 1, probabilities[:, 1])
    aucs = [_binary_auc(labels == c, probabilities[:, c]) for c in range(classes)]
    return math.nan if any(math.isnan(a) for a in aucs) else float(np.mean(aucs))


@dataclass(frozen=True)
class RegressionScores:
    """A regression model's scores on rows with known labels, in the label's own units:
    `rmse` and `mae` (units of the label), `r2` (1 − Σ(y − ŷ)² / Σ(y − ȳ)², scikit-learn's
    r2_score; NaN when every label is equal). The baseline predicts one constant for every
    row, the mean ȳ of these same rows: the best constant in hindsight, a bar a model that
    learnt anything clears (its R² is 0 by definition). On the server's test set ȳ comes from
    the server's own held-out rows, so it releases nothing about any client. `loss` is the
    training loss (`train.loss`) on the scaled target (common.data.target)."""
    loss: float
    rmse: float
    mae: float
    r2: float
    baseline_rmse: float
    baseline_mae: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def score_regression(model: nn.Module, features: np.ndarray, targets: np.ndarray, scale,
                     loss: str = "mse", batch_size: int = 4096,
                     device: str | torch.device = "cpu") -> RegressionScores:
    """Scores of `model` (one output (B, 1): the scaled prediction) on `features` (N, ...)
    with scaled float32 `targets` (N,); `scale` (common.data.target.TargetScale) maps both
    back to the label's units; the forward passes on `device` (`logits`). Raises ValueError
    for a model with more than one output."""
    out = logits(model, features, batch_size, device)
    scaled_loss = float(task_loss(loss, out, torch.from_numpy(targets), reduction="sum"))
    predicted = scale.decode(out[:, 0].double().numpy())
    y = scale.decode(targets)
    errors = predicted - y
    rows = max(len(y), 1)
    spread = y - y.mean() if len(y) else y
    total = float((spread ** 2).sum())
    return RegressionScores(
        loss=scaled_loss / rows, rmse=math.sqrt(float((errors ** 2).sum()) / rows),
        mae=float(np.abs(errors).sum()) / rows,
        r2=1.0 - float((errors ** 2).sum()) / total if total > 0 else math.nan,
        baseline_rmse=math.sqrt(total / rows), baseline_mae=float(np.abs(spread).sum()) / rows)
