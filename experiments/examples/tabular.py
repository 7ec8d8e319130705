"""A tabular model as a user would write it, outside privet's registry:
`[train] model = "experiments.examples.tabular:residual_mlp"`.

Not an nn.Sequential (a residual block), with LayerNorm and Dropout: privet's one-pass
DP-SGD does not take it, so clients.train.dp_path sends it to Opacus, with the same
sampling, noise and accounting. `batchnorm_mlp` is the same idea with BatchNorm, which
DP-SGD cannot train: refused before round 1, or replaced with `train.fix-model = true`.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from privet.common.config import TrainConfig


class ResidualMLP(nn.Module):
    """x (B, features) → logits (B, outputs): a projection, one pre-norm residual block
    (LayerNorm → Linear → GELU → Dropout → Linear), a LayerNorm and a linear head."""

    def __init__(self, features: int, outputs: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.project = nn.Linear(features, hidden)
        self.block = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(),
                                   nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, outputs))

    def forward(self, x: Tensor) -> Tensor:
        h = self.project(x.flatten(1))
        return self.head(h + self.block(h))


def residual_mlp(input_shape: tuple[int, ...], num_outputs: int, train: TrainConfig
                 ) -> nn.Module:
    """privet's factory signature: one example's shape, the classes, the train config."""
    return ResidualMLP(math.prod(input_shape), num_outputs, train.hidden)


def batchnorm_mlp(input_shape: tuple[int, ...], num_outputs: int, train: TrainConfig
                  ) -> nn.Module:
    """An MLP with BatchNorm, which mixes the examples of a batch: not DP-SGD-trainable."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), train.hidden),
                         nn.BatchNorm1d(train.hidden), nn.ReLU(),
                         nn.Linear(train.hidden, num_outputs))
