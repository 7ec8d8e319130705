"""Model registry. Every model is Opacus-compatible: no BatchNorm (use GroupNorm if needed)."""

from __future__ import annotations

from torch import nn

from common.config import TrainConfig


def build_model(train: TrainConfig, num_features: int, num_classes: int) -> nn.Module:
    if train.model == "mlp":
        return nn.Sequential(nn.Linear(num_features, train.hidden), nn.ReLU(),
                             nn.Linear(train.hidden, num_classes))
    if train.model == "logreg":
        return nn.Sequential(nn.Linear(num_features, num_classes))
    raise ValueError(f"train.model = {train.model!r}: no such model")
