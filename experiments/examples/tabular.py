"""Tabular models as a user would write them, outside privet's registry:
`[train] model = "experiments.examples.tabular:residual_mlp"` (or `:embedding_mlp`).

Not nn.Sequentials (a residual block), with LayerNorm and Dropout: privet's one-pass
DP-SGD takes them (clients.bookkeeping), with the same sampling, noise and accounting as
Opacus would. `embedding_mlp` looks each categorical column up in an nn.Embedding, from the
feature description privet gives a factory that takes the keyword `features`
(common.data.features); `CodeEmbeddingMLP` is the same idea on integer category codes (one
table, columns offset into it), for inputs that carry codes. `batchnorm_mlp` is the
residual idea with BatchNorm, which DP-SGD cannot train: refused before round 1, or
replaced with `train.fix-model = true`.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from privet.common.config import TrainConfig
from privet.common.data.features import Features


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


class CodeEmbeddingMLP(nn.Module):
    """x (B, categorical + numeric) → logits (B, outputs). The first `len(cardinalities)`
    columns are integer category codes (code c of column j in 0..cardinalities[j] - 1; any
    dtype, float32 as privet's arrays hold them included), the rest numeric. Every column's
    codes look up rows of one nn.Embedding table (columns offset into it), concatenated with
    the numeric columns, then LayerNorm → Linear → GELU → Dropout → Linear.

    privet's tabular preprocessing one-hot encodes categoricals, so `embedding_mlp` is the
    factory for privet's rows; this one is built directly where inputs carry codes
    (experiments/bench_dpsgd.py, tests)."""

    def __init__(self, cardinalities: list[int], numeric: int, outputs: int, hidden: int,
                 dim: int = 8, dropout: float = 0.1):
        super().__init__()
        self.columns = len(cardinalities)
        offsets = [0] + list(itertools.accumulate(cardinalities))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64),
                             persistent=False)
        self.embedding = nn.Embedding(sum(cardinalities), dim)
        width = dim * self.columns + numeric
        self.body = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(hidden, outputs))

    def forward(self, x: Tensor) -> Tensor:
        codes = x[:, :self.columns].long() + self.offsets
        looked_up = self.embedding(codes).flatten(1)  # (B, columns · dim)
        return self.body(torch.cat([looked_up, x[:, self.columns:].float()], 1))


def residual_mlp(input_shape: tuple[int, ...], num_outputs: int, train: TrainConfig
                 ) -> nn.Module:
    """privet's factory signature: one example's shape, the classes, the train config."""
    return ResidualMLP(math.prod(input_shape), num_outputs, train.hidden)


def embedding_dim(cardinality: int) -> int:
    """An embedding's width for a column of `cardinality` values: min(8, ⌈1.6·k^0.56⌉), the
    fast.ai rule of thumb capped small (DP noise grows with every parameter)."""
    return min(8, math.ceil(1.6 * cardinality ** 0.56))


def category_index(block: Tensor) -> Tensor:
    """A one-hot block (B, k-1) → the index of each row's value (B,) in an embedding of k
    rows: the position of the 1, or k-1 (reserved) where the block is all zero."""
    hot, index = block.max(dim=1)
    return torch.where(hot > 0.5, index, block.shape[1])


class EmbeddingMLP(nn.Module):
    """x (B, features) → logits (B, outputs), for privet's encoded rows: scaled numbers and,
    per categorical column, a one-hot block (`features` says which columns are which).

    - each categorical block (B, k-1) → its index (B,): the position of its 1, or k-1 when
      the block is all zero (a value whose column feature selection dropped) →
      nn.Embedding(k, d) → (B, d), d = embedding_dim(k);
    - the numbers (B, n) → Linear(n, hidden/4) → (B, hidden/4);
    - concatenated (B, D), D = hidden/4 + Σ d → LayerNorm(D) → Linear(D, hidden) → h;
    - one pre-norm residual block: h + Linear(Dropout(GELU(Linear(LayerNorm(h))))) (B, hidden);
    - LayerNorm → Linear(hidden, outputs).

    Taking the index inside the model keeps the rows privet sends one-hot (every other model
    reads the same rows) and is exact: a one-hot times a weight matrix is a row lookup. The
    index carries no gradient; the embedding rows of values absent from a batch get none
    (DP-SGD's noise reaches them as any parameter).
    """

    def __init__(self, features: Features, outputs: int, hidden: int, dropout: float = 0.1):
        super().__init__()
        self.numeric = list(features.numeric)
        self.blocks = [(c.start, c.stop) for c in features.categorical]
        self.embeddings = nn.ModuleList(
            nn.Embedding(c.cardinality, embedding_dim(c.cardinality))
            for c in features.categorical)
        width = sum(e.embedding_dim for e in self.embeddings)
        self.numbers = None
        if self.numeric:
            self.numbers = nn.Linear(len(self.numeric), max(hidden // 4, 1))
            width += self.numbers.out_features
        self.project = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden))
        self.block = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU(),
                                   nn.Dropout(dropout), nn.Linear(hidden, hidden))
        self.head = nn.Sequential(nn.LayerNorm(hidden), nn.Linear(hidden, outputs))

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        parts = [self.numbers(x[:, self.numeric])] if self.numbers is not None else []
        for (start, stop), table in zip(self.blocks, self.embeddings):
            parts.append(table(category_index(x[:, start:stop])))
        h = self.project(torch.cat(parts, dim=1))
        return self.head(h + self.block(h))


def embedding_mlp(input_shape: tuple[int, ...], num_outputs: int, train: TrainConfig, *,
                  features: Features | None = None) -> nn.Module:
    """privet's factory signature with the keyword `features`: privet then passes what each
    input column is. Without a description (images, or a caller that has none) every
    input is a number: no embedding."""
    if features is None:
        width = math.prod(input_shape)
        features = Features(tuple(f"x{i}" for i in range(width)), tuple(range(width)), ())
    return EmbeddingMLP(features, num_outputs, train.hidden)


def batchnorm_mlp(input_shape: tuple[int, ...], num_outputs: int, train: TrainConfig
                  ) -> nn.Module:
    """An MLP with BatchNorm, which mixes the examples of a batch: not DP-SGD-trainable."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), train.hidden),
                         nn.BatchNorm1d(train.hidden), nn.ReLU(),
                         nn.Linear(train.hidden, num_outputs))
