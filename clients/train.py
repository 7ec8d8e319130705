"""Local training: non-private SGD or DP-SGD.

Nothing here knows about Flower. DP-SGD is Opacus' algorithm: Poisson sampling at rate
q = 1/⌈n/B⌉ for ⌈n/B⌉ steps an epoch (what Opacus' DPDataLoader does), per-sample clipping to
C and Gaussian noise σ·C; the steps actually taken are what the ledger records. The shipped
models run it through clients.bookkeeping (the same steps in one backward pass); Opacus'
grad-sample modes run it through Opacus itself.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from clients.bookkeeping import BookkeepingDPSGD
from clients.sgd import SGD
from common.opacus_import import opacus

BOOKKEEPING = "bookkeeping"  # privet's one-pass DP-SGD (clients.bookkeeping), not an Opacus mode


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


def train_local(model: nn.Module, features: np.ndarray, labels: np.ndarray, *, epochs: int,
                batch_size: int, lr: float, momentum: float, seed: int,
                noise_multiplier: float | None = None, max_grad_norm: float = 1.0,
                grad_sample_mode: str = "hooks") -> LocalResult:
    """Train `model` in place. With `noise_multiplier` set, this is DP-SGD, computed by
    privet's book-keeping path (grad_sample_mode "bookkeeping") or by Opacus (its modes)."""
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_all, y_all = torch.from_numpy(features), torch.from_numpy(labels)
    tally = _Tally()
    model.train()
    if noise_multiplier is None:
        optimizer = SGD(model.parameters(), lr=lr, momentum=momentum)
        # The batches torch's shuffling DataLoader gives, draw for draw (its RandomSampler also
        # draws a second, empty-sliced permutation an epoch), without its per-row collation.
        for _ in range(epochs):
            _start_dataloader_epoch(generator)
            order = torch.randperm(len(y_all), generator=generator)
            torch.randperm(len(y_all), generator=generator)
            for batch in order.split(batch_size):
                x, y = x_all[batch], y_all[batch]
                optimizer.zero_grad(set_to_none=True)
                out = model(x)
                loss = functional.cross_entropy(out, y)
                loss.backward()
                optimizer.step()
                tally.add(out.detach(), loss.detach() * len(y), y)
    elif grad_sample_mode == BOOKKEEPING:
        rate = sample_rate(len(y_all), batch_size)
        dpsgd = BookkeepingDPSGD(
            model, SGD(model.parameters(), lr=lr, momentum=momentum),
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            expected_batch_size=int(len(y_all) * rate),
            noise_generator=torch.Generator().manual_seed(seed + 1))
        for _ in range(epochs):
            _start_dataloader_epoch(generator)
            # Opacus' UniformWithReplacementSampler, draw for draw (one row of draws a step)
            draws = torch.rand(steps_per_epoch(len(y_all), batch_size), len(y_all),
                               generator=generator)
            for chosen in draws < rate:
                rows = chosen.nonzero().squeeze(1)
                y = y_all[rows]
                out, loss_sum = dpsgd.step(x_all[rows], y)
                tally.add(out, loss_sum, y)
    else:
        _train_opacus(model, x_all, y_all, tally, epochs=epochs, batch_size=batch_size,
                      lr=lr, momentum=momentum, generator=generator, seed=seed,
                      noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                      grad_sample_mode=grad_sample_mode)
    return LocalResult(loss=tally.loss_sum / max(tally.seen, 1),
                       accuracy=tally.correct / max(tally.seen, 1), steps=tally.steps,
                       examples=len(labels), seconds=time.perf_counter() - start)


def _start_dataloader_epoch(generator: torch.Generator) -> None:
    """The draw torch's DataLoader takes from its generator as each epoch starts (the workers'
    base seed), taken here too so that the batches are the DataLoader's, draw for draw."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)


class _Tally:
    """Steps taken and the training loss and accuracy over the examples they used."""

    def __init__(self) -> None:
        self.steps, self.seen, self.correct, self.loss_sum = 0, 0, 0, 0.0

    def add(self, out: torch.Tensor, loss_sum: torch.Tensor, y: torch.Tensor) -> None:
        self.steps += 1
        if len(y):
            self.seen += len(y)
            self.loss_sum += float(loss_sum)
            self.correct += int((out.argmax(1) == y).sum())


def _train_opacus(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, tally: _Tally,
                  *, epochs: int, batch_size: int, lr: float, momentum: float,
                  generator: torch.Generator, seed: int, noise_multiplier: float,
                  max_grad_norm: float, grad_sample_mode: str) -> None:
    loader = DataLoader(TensorDataset(x_all, y_all), batch_size=batch_size, shuffle=True,
                        generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)  # Opacus wraps it
    criterion: nn.Module = nn.CrossEntropyLoss()
    with warnings.catch_warnings():
        # "Secure RNG turned off": true, and stated in the README; not news every round.
        warnings.simplefilter("ignore")
        # its accountant is unused: the ledger counts
        engine = opacus().PrivacyEngine(accountant="rdp")
        private = engine.make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            poisson_sampling=True, grad_sample_mode=grad_sample_mode,
            noise_generator=torch.Generator().manual_seed(seed + 1))
    if len(private) == 4:  # ghost clipping also wraps the loss
        net, dp_optimizer, criterion, dp_loader = private
    else:
        net, dp_optimizer, dp_loader = private
    net.train()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    for _ in range(epochs):
        for x, y in dp_loader:
            dp_optimizer.zero_grad(set_to_none=True)
            out = net(x)
            loss = criterion(out, y)
            loss.backward()
            dp_optimizer.step()
            tally.add(out.detach(), loss.detach() * len(y), y)
    net._close()  # remove Opacus hooks so `model` is a plain module again
