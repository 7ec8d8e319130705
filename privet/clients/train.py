"""Local training: non-private SGD or DP-SGD.

Nothing here knows about Flower. DP-SGD is Opacus' algorithm: Poisson sampling at rate
q = 1/⌈n/B⌉ for ⌈n/B⌉ steps an epoch (Opacus' DPDataLoader, which though takes int(1/q) steps,
one fewer for some ⌈n/B⌉), per-sample clipping to C, Gaussian noise σ·C and the sum divided
by ⌊q·n⌋; the steps actually taken are what the ledger records. The shipped
models run it through clients.bookkeeping (the same steps in one backward pass); Opacus'
grad-sample modes run it through Opacus itself. Both paths draw the rows of every step and
the noise from one `Randomness` (common.privacy.randomness): seeded for simulation, secure
(OS entropy) for a deployed client, which must not use a seed the server could know.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional
from torch.utils.data import DataLoader, TensorDataset

from privet.clients.bookkeeping import BookkeepingDPSGD
from privet.clients.sgd import SGD, add_proximal_term
from privet.common.opacus_import import opacus
from privet.common.privacy.randomness import Randomness, SeededRandomness

BOOKKEEPING = "bookkeeping"  # privet's one-pass DP-SGD (clients.bookkeeping), not an Opacus mode
# Opacus' mode for models the one-pass path does not support: hooks handles every layer it
# has a grad sampler for and falls back to functorch for the rest; its ghost clipping is
# faster on some large models but refuses layers without a norm sampler.
OPACUS_MODE = "hooks"


def dp_path(model: nn.Module) -> str:
    """How DP-SGD computes clipped gradients for `model`: privet's one-pass book-keeping
    where it supports every trainable layer (clients.bookkeeping.supports), else Opacus'
    `OPACUS_MODE`. Both give the same steps, noise and accounting."""
    from privet.clients.bookkeeping import supports
    return BOOKKEEPING if supports(model) else OPACUS_MODE


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


def expected_batch_size(num_rows: int, batch_size: int) -> int:
    """⌊q·n⌋ = ⌊n / ⌈n/B⌉⌋ rows (q = `sample_rate`), in integers: the divisor of DP-SGD's
    noisy sum. Opacus computes int(n · (1/k)) in floating point, one short where n·(1/k)
    rounds below a whole number (0 for n = 49, B = 1, where every step would fail)."""
    return num_rows // steps_per_epoch(num_rows, batch_size)


def train_local(model: nn.Module, features: np.ndarray, labels: np.ndarray, *, epochs: int,
                batch_size: int, lr: float, momentum: float, seed: int,
                noise_multiplier: float | None = None, max_grad_norm: float = 1.0,
                grad_sample_mode: str = "hooks", randomness: Randomness | None = None,
                proximal_mu: float = 0.0) -> LocalResult:
    """Train `model` in place. With `noise_multiplier` set, this is DP-SGD, computed by
    privet's book-keeping path (grad_sample_mode "bookkeeping") or by Opacus (its modes
    "hooks", "ghost", "functorch", "ew").

    `randomness` supplies every DP draw: which rows each step takes and the Gaussian noise.
    None means `SeededRandomness(seed)` (rows from a generator seeded with `seed`, noise from
    one seeded with `seed + 1`), reproducible and fit for simulation only. Non-private
    training ignores it: its shuffling, seeded with `seed`, protects nothing.

    `proximal_mu` > 0 is FedProx: each step adds μ·(w − w_start) to the (noised) gradient,
    w_start being the weights `model` has now (clients.sgd.add_proximal_term)."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    x_all, y_all = torch.from_numpy(features), torch.from_numpy(labels)
    tally = _Tally()
    model.train()
    if noise_multiplier is None:
        _train_plain(model, x_all, y_all, tally, epochs=epochs, batch_size=batch_size, lr=lr,
                     momentum=momentum, seed=seed, proximal_mu=proximal_mu)
    else:
        randomness = randomness if randomness is not None else SeededRandomness(seed)
        batches = _poisson_batches(randomness, len(y_all), batch_size, epochs)
        dp = dict(randomness=randomness, lr=lr, momentum=momentum,
                  noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                  proximal_mu=proximal_mu)
        if grad_sample_mode == BOOKKEEPING:
            _train_bookkeeping(model, x_all, y_all, tally, batches,
                               expected_batch_size=expected_batch_size(len(y_all), batch_size),
                               **dp)
        else:
            _train_opacus(model, x_all, y_all, tally, batches, batch_size=batch_size,
                          grad_sample_mode=grad_sample_mode, **dp)
    return LocalResult(loss=tally.loss_sum / max(tally.seen, 1),
                       accuracy=tally.correct / max(tally.seen, 1), steps=tally.steps,
                       examples=len(labels), seconds=time.perf_counter() - start)


def _train_plain(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, tally: _Tally,
                 *, epochs: int, batch_size: int, lr: float, momentum: float,
                 seed: int, proximal_mu: float = 0.0) -> None:
    """Non-private SGD over shuffled batches: the batches torch's shuffling DataLoader with a
    generator seeded `seed` gives, draw for draw (its RandomSampler also draws a second,
    empty-sliced permutation an epoch), without its per-row collation."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = SGD(model.parameters(), lr=lr, momentum=momentum)
    add_proximal_term(optimizer, optimizer.params, proximal_mu)
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


def _start_dataloader_epoch(generator: torch.Generator) -> None:
    """The draw torch's DataLoader takes from its generator as each epoch starts (the workers'
    base seed), taken here too so that the batches are the DataLoader's, draw for draw."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)


def _poisson_batches(randomness: Randomness, num_rows: int, batch_size: int, epochs: int
                     ) -> Iterator[torch.Tensor]:
    """The rows of each DP-SGD step, as an int64 index tensor (empty when no row is drawn):
    `steps_per_epoch` steps an epoch, each row in each step with probability `sample_rate`,
    independently; `randomness.start_epoch()` as each epoch starts.

    Seeded, these are Opacus' DPDataLoader batches draw for draw (torch.rand(n) < q a step,
    after the DataLoader's draw at the start of an epoch), except that Opacus takes int(1/q)
    steps an epoch, one fewer than ⌈n/B⌉ where 1/(1/k) rounds below k (k = 93, 99, …)."""
    rate = sample_rate(num_rows, batch_size)
    for _ in range(epochs):
        randomness.start_epoch()
        for _ in range(steps_per_epoch(num_rows, batch_size)):
            # One step's mask at a time: memory O(n) rather than O(n²/B) an epoch, one call a
            # step; seeded, torch.rand fills serially, so the stream is the same either way.
            yield randomness.poisson_masks(1, num_rows, rate)[0].nonzero().squeeze(1)


class _Tally:
    """Steps taken and the training loss and accuracy over the examples they used."""

    def __init__(self) -> None:
        self.steps, self.seen, self.correct, self.loss_sum = 0, 0, 0, 0.0

    def add(self, out: torch.Tensor | None, loss_sum: torch.Tensor | None, y: torch.Tensor
            ) -> None:
        """One step on the labels `y`; `out` (logits) and `loss_sum` are read only when `y`
        is not empty."""
        self.steps += 1
        if len(y):
            self.seen += len(y)
            self.loss_sum += float(loss_sum)
            self.correct += int((out.argmax(1) == y).sum())


def _train_bookkeeping(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor,
                       tally: _Tally, batches: Iterator[torch.Tensor], *,
                       randomness: Randomness, expected_batch_size: int, lr: float,
                       momentum: float, noise_multiplier: float, max_grad_norm: float,
                       proximal_mu: float = 0.0) -> None:
    """DP-SGD by clients.bookkeeping, one step a batch of row indices."""
    optimizer = SGD(model.parameters(), lr=lr, momentum=momentum)
    dpsgd = BookkeepingDPSGD(
        model, add_proximal_term(optimizer, optimizer.params, proximal_mu),
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size, randomness=randomness)
    for rows in batches:
        y = y_all[rows]
        out, loss_sum = dpsgd.step(x_all[rows], y)
        tally.add(out, loss_sum, y)


def _train_opacus(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, tally: _Tally,
                  batches: Iterator[torch.Tensor], *, batch_size: int, grad_sample_mode: str,
                  randomness: Randomness, lr: float, momentum: float, noise_multiplier: float,
                  max_grad_norm: float, proximal_mu: float = 0.0) -> None:
    """DP-SGD by Opacus' `grad_sample_mode`, on privet's batches and with privet's noise.

    Opacus computes the per-sample gradients, clips and sums them and scales the noisy sum;
    the rows of each step come from `batches` (not Opacus' DPDataLoader) and the noise from
    `randomness` (not a torch.Generator; see `_use_randomness`). An empty batch is a step of
    noise alone, as in Opacus."""
    net, dp_optimizer, criterion = _make_private(
        model, TensorDataset(x_all, y_all), batch_size=batch_size, lr=lr, momentum=momentum,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        grad_sample_mode=grad_sample_mode)
    _use_randomness(dp_optimizer, randomness,
                    expected_batch_size=expected_batch_size(len(y_all), batch_size))
    # DPOptimizer.step clips, noises and scales, then calls the wrapped optimizer's step
    inner = dp_optimizer.original_optimizer
    add_proximal_term(inner, [p for g in inner.param_groups for p in g["params"]], proximal_mu)
    net.train()
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    for rows in batches:
        x, y = x_all[rows], y_all[rows]
        dp_optimizer.zero_grad(set_to_none=True)
        if len(y) or grad_sample_mode != "ew":
            out = net(x)
            loss = criterion(out, y)
            loss.backward()
            tally.add(out.detach(), loss.detach() * len(y), y)
        else:  # torch's ExpandedWeights refuses a batch of 0 rows
            _no_per_sample_gradients(dp_optimizer)
            tally.add(None, None, y)
        dp_optimizer.step()
    net._close()  # remove Opacus hooks so `model` is a plain module again


def _make_private(model: nn.Module, dataset: TensorDataset, *, batch_size: int, lr: float,
                  momentum: float, noise_multiplier: float, max_grad_norm: float,
                  grad_sample_mode: str) -> tuple[nn.Module, object, nn.Module]:
    """Opacus' PrivacyEngine.make_private for `model` and torch's SGD: (its GradSampleModule,
    its DPOptimizer, the loss to call: ghost clipping wraps cross-entropy). The DPDataLoader
    it also returns is dropped unused (privet draws the batches); Poisson sampling is still
    declared, so the module refuses to accumulate per-sample gradients across steps."""
    # make_private reads only this loader's dataset and length, ⌈n/B⌉ batches
    loader = DataLoader(dataset, batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)  # Opacus wraps it
    with warnings.catch_warnings():
        # "Secure RNG turned off": Opacus' own RNG, which draws nothing here (the noise and
        # the batches come from privet's Randomness).
        warnings.simplefilter("ignore")
        # its accountant is unused: the ledger counts
        engine = opacus().PrivacyEngine(accountant="rdp")
        private = engine.make_private(
            module=model, optimizer=optimizer, criterion=nn.CrossEntropyLoss(),
            data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True,
            grad_sample_mode=grad_sample_mode)
    if len(private) == 4:  # ghost clipping also wraps the loss
        net, dp_optimizer, criterion, _ = private
    else:
        (net, dp_optimizer, _), criterion = private, nn.CrossEntropyLoss()
    return net, dp_optimizer, criterion


# Where privet reaches into Opacus (read against opacus 1.6.x, which pyproject pins; re-read
# both functions below on an upgrade):
# - DPOptimizer draws its noise inside add_noise (p.grad = p.summed_grad + _generate_noise(σC,
#   p.summed_grad, generator)) from a torch.Generator, or from torchcsprng in its secure_mode,
#   which has no build for this torch; there is no hook for another source. `_use_randomness`
#   wraps add_noise on the one optimizer instance, whatever its class (ghost clipping has its
#   own): Opacus' add_noise runs at σ = 0, where _generate_noise returns zeros and draws
#   nothing, so its checks that each clipped sum is noised once still run; then privet adds
#   randomness.gaussian(shape, σC). Seeded, that is Opacus' draw bit for bit, (s + 0) + n =
#   s + n. Reimplementing add_noise instead would call Opacus' private flag helpers.
# - An empty batch in mode "ew" gets the per-sample gradients (p.grad_sample, 0 rows) that
#   the other modes' backward passes leave, so the optimizer takes its step of noise alone.
_OPACUS_SERIES = "1.6."


def _use_randomness(dp_optimizer, randomness: Randomness, *, expected_batch_size: int) -> None:
    """Make Opacus' `dp_optimizer` draw its Gaussian noise from `randomness` (std σC per
    parameter, in its parameter order) and divide by `expected_batch_size` (⌊q·n⌋ for the
    rate privet samples at; Opacus' make_private divides by ⌊n / int(1/q)⌋, which differs
    where 1/(1/k) rounds below k). Raises RuntimeError for an Opacus this was not read
    against."""
    version = opacus().__version__
    if not version.startswith(_OPACUS_SERIES):
        raise RuntimeError(f"privet.clients.train wraps DPOptimizer.add_noise as read in opacus "
                           f"{_OPACUS_SERIES}x; found opacus {version}: re-read it first")
    dp_optimizer.expected_batch_size = expected_batch_size
    opacus_add_noise = dp_optimizer.add_noise

    def add_noise() -> None:
        noise_multiplier = dp_optimizer.noise_multiplier
        dp_optimizer.noise_multiplier = 0.0
        try:
            opacus_add_noise()  # p.grad = p.summed_grad, each marked as noised
        finally:
            dp_optimizer.noise_multiplier = noise_multiplier
        std = noise_multiplier * dp_optimizer.max_grad_norm
        for p in dp_optimizer.params:
            p.grad.add_(randomness.gaussian(p.grad.shape, std, p.grad.dtype))

    dp_optimizer.add_noise = add_noise


def _no_per_sample_gradients(dp_optimizer) -> None:
    """Per-sample gradients of 0 rows for each of `dp_optimizer`'s parameters, as Opacus'
    grad-sample modes leave them after the backward pass of an empty batch."""
    for p in dp_optimizer.params:
        p.grad_sample = p.new_zeros((0, *p.shape))
