"""Plain torch local training: non-private SGD or Opacus DP-SGD, and evaluation.

Nothing here knows about Flower. DP-SGD uses Opacus with Poisson sampling (rate
q = 1/⌈n/B⌉, ⌈n/B⌉ steps per epoch, exactly what Opacus' DPDataLoader does), per-sample
clipping to C and Gaussian noise σ·C; the steps actually taken are what the ledger records.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

# Opacus calls logging.basicConfig() on import, which would print every Flower log
# line twice (once by Flower's handler, once by the root handler it adds).
_root_handlers = list(logging.getLogger().handlers)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from opacus import PrivacyEngine
for _handler in logging.getLogger().handlers:
    if _handler not in _root_handlers:
        logging.getLogger().removeHandler(_handler)


@dataclass(frozen=True)
class LocalResult:
    loss: float
    accuracy: float
    steps: int
    examples: int
    seconds: float


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    return math.ceil(num_rows / batch_size)


def sample_rate(num_rows: int, batch_size: int) -> float:
    """Opacus' DPDataLoader samples each row with probability 1/len(loader)."""
    return 1.0 / steps_per_epoch(num_rows, batch_size)


def _dataset(features: np.ndarray, labels: np.ndarray) -> TensorDataset:
    return TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))


def train_local(model: nn.Module, features: np.ndarray, labels: np.ndarray, *, epochs: int,
                batch_size: int, lr: float, momentum: float, seed: int,
                noise_multiplier: float | None = None, max_grad_norm: float = 1.0,
                grad_sample_mode: str = "hooks") -> LocalResult:
    """Train `model` in place. With `noise_multiplier` set, this is DP-SGD."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    loader = DataLoader(_dataset(features, labels), batch_size=batch_size, shuffle=True,
                        generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    criterion: nn.Module = nn.CrossEntropyLoss()
    net = model
    if noise_multiplier is not None:
        with warnings.catch_warnings():
            # "Secure RNG turned off": true, and stated in the README; not news every round.
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")  # its accountant is unused: the ledger counts
            private = engine.make_private(
                module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
                noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                poisson_sampling=True, grad_sample_mode=grad_sample_mode,
                noise_generator=torch.Generator().manual_seed(seed + 1))
        if len(private) == 4:  # ghost clipping also wraps the loss
            net, optimizer, criterion, loader = private
        else:
            net, optimizer, loader = private
    net.train()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    steps, seen, correct, loss_sum = 0, 0, 0, 0.0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            out = net(x)
            loss = criterion(out, y)
            loss.backward()
            optimizer.step()
            steps += 1
            if len(y):
                seen += len(y)
                loss_sum += float(loss.detach()) * len(y)
                correct += int((out.detach().argmax(1) == y).sum())
    if noise_multiplier is not None:
        net._close()  # remove Opacus hooks so `model` is a plain module again
    return LocalResult(loss=loss_sum / max(seen, 1), accuracy=correct / max(seen, 1),
                       steps=steps, examples=len(labels), seconds=time.perf_counter() - start)
