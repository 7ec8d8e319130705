"""Model registry. Every model is Opacus-compatible: no BatchNorm (use GroupNorm if needed)."""

from __future__ import annotations

import math

from torch import nn

from common.config import TrainConfig

# How DP-SGD computes clipped gradients, per model: privet's one-pass book-keeping
# (clients.bookkeeping) for all three. Step time over plain SGD, experiments/bench_dpsgd.py
# (2 cores, one torch thread, batch 64): Adult MLP 1.97x (Opacus ghost 9.2x, hooks 11.6x),
# logreg 1.87x; digits MLP 1.82x, CNN 1.42x (ghost 3.0x); Fashion-MNIST CNN 1.6x (hooks 2.3x).
GRAD_SAMPLE_MODE = {"mlp": "bookkeeping", "logreg": "bookkeeping", "cnn": "bookkeeping"}


def build_model(train: TrainConfig, input_shape: tuple[int, ...], num_classes: int
                ) -> nn.Module:
    """`input_shape` is one example's shape: (features,) or (channels, height, width)."""
    num_inputs = math.prod(input_shape)
    if train.model == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(num_inputs, train.hidden), nn.ReLU(),
                             nn.Linear(train.hidden, num_classes))
    if train.model == "logreg":
        return nn.Sequential(nn.Flatten(), nn.Linear(num_inputs, num_classes))
    if train.model == "cnn":
        return _cnn(input_shape, train.hidden, num_classes)
    raise ValueError(f"train.model = {train.model!r}: no such model")


def _cnn(input_shape: tuple[int, ...], hidden: int, num_classes: int) -> nn.Module:
    """Two 3x3 convolutions, then dense layers; for (channels, height, width) inputs of 8x8
    and up. The adaptive pool fixes the dense input at 32x4x4 whatever the image size, and
    keeps the per-sample gradient work (what DP-SGD pays for) small on a CPU."""
    if len(input_shape) != 3:
        raise ValueError(f"train.model = 'cnn' needs image input (channels, height, width), "
                         f"got one example of shape {tuple(input_shape)}")
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(32 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
