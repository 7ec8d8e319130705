"""The training losses, shared by local training (both DP-SGD paths), evaluation and the
noised training metrics.

- `cross-entropy` (classification): outputs (B, classes) are logits, labels (B,) int64 class
  indices; in nats.
- `mse` (regression): outputs (B, 1), labels (B,) float32 targets scaled to [−1, 1]
  (common.data.target); the squared error of the one output, in scaled units.
- `huber` (regression): PyTorch's Huber loss with its default δ = 1 on the scaled target:
  e²/2 for |e| ≤ 1, |e| − 1/2 beyond. δ = 1 is half the target's public range.

Every loss is a sum (or mean) of per-example terms, so the gradient of the summed loss at
each example's output is that example's own: what DP-SGD's per-example clipping needs
(clients.bookkeeping).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

LOSSES = ("cross-entropy", "mse", "huber")
HUBER_DELTA = 1.0


def task_loss(name: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean"
              ) -> torch.Tensor:
    """Loss `name` of outputs `out` against labels `y` (shapes in the module doc), reduced
    by "mean", "sum" or "none" ((B,) per example). Raises ValueError for another name, or
    a regression output that is not one number per example."""
    if name == "cross-entropy":
        return functional.cross_entropy(out, y, reduction=reduction)
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
    if out.dim() != 2 or out.shape[1] != 1:
        raise ValueError(f"a regression model has one output per example, shape (B, 1); got "
                         f"{tuple(out.shape)}")
    prediction = out.squeeze(1)
    if name == "mse":
        return functional.mse_loss(prediction, y, reduction=reduction)
    return functional.huber_loss(prediction, y, reduction=reduction, delta=HUBER_DELTA)


class TaskLoss(nn.Module):
    """`task_loss` as a criterion module with a `reduction` attribute, which Opacus' ghost
    clipping sets to "none" to get per-example losses."""

    def __init__(self, name: str, reduction: str = "mean"):
        super().__init__()
        self.name, self.reduction = name, reduction

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return task_loss(self.name, out, y, self.reduction)
