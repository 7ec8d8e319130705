"""Model registry. Every model is Opacus-compatible: no BatchNorm (use GroupNorm if needed)."""

from __future__ import annotations

from torch import nn

from common.config import TrainConfig

# Fastest Opacus grad-sample mode per model, measured with experiments/bench_dpsgd.py
# (2 cores, one torch thread, Adult, batch 64): MLP ghost 3.4x plain SGD vs hooks 3.8x,
# functorch 6.0x; logistic regression hooks 2.4x vs ghost 3.0x.
GRAD_SAMPLE_MODE = {"mlp": "ghost", "logreg": "hooks"}


def build_model(train: TrainConfig, num_features: int, num_classes: int) -> nn.Module:
    if train.model == "mlp":
        return nn.Sequential(nn.Linear(num_features, train.hidden), nn.ReLU(),
                             nn.Linear(train.hidden, num_classes))
    if train.model == "logreg":
        return nn.Sequential(nn.Linear(num_features, num_classes))
    raise ValueError(f"train.model = {train.model!r}: no such model")
