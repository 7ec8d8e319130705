"""Model registry. Every model is Opacus-compatible: no BatchNorm (use GroupNorm if needed)."""

from __future__ import annotations

import math

from torch import nn

from common.config import TrainConfig

# Fastest Opacus grad-sample mode per model, measured with experiments/bench_dpsgd.py
# (2 cores, one torch thread, Adult, batch 64): MLP ghost 3.4x plain SGD vs hooks 3.8x,
# functorch 6.0x; logistic regression hooks 2.4x vs ghost 3.0x.
GRAD_SAMPLE_MODE = {"mlp": "ghost", "logreg": "hooks"}


def build_model(train: TrainConfig, input_shape: tuple[int, ...], num_classes: int
                ) -> nn.Module:
    """`input_shape` is one example's shape: (features,) or (channels, height, width)."""
    num_inputs = math.prod(input_shape)
    if train.model == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(num_inputs, train.hidden), nn.ReLU(),
                             nn.Linear(train.hidden, num_classes))
    if train.model == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(num_inputs, num_classes))
    raise ValueError(f"train.model = {train.model!r}: no such model")
