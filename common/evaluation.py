"""Evaluation shared by the server (test set) and the clients (their own rows)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def evaluate(model: nn.Module, features: np.ndarray, labels: np.ndarray,
             batch_size: int = 4096) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) in batched passes."""
    model.eval()
    x_all, y_all = torch.from_numpy(features), torch.from_numpy(labels)
    loss, correct = 0.0, 0
    for i in range(0, len(y_all), batch_size):
        x, y = x_all[i:i + batch_size], y_all[i:i + batch_size]
        out = model(x)
        loss += float(nn.functional.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    return loss / len(y_all), correct / len(y_all)
