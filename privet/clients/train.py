"""Local training: non-private SGD or DP-SGD.

Nothing here knows about Flower. DP-SGD is Opacus' algorithm: Poisson sampling at rate
q = 1/⌈n/B⌉ for ⌈n/B⌉ steps an epoch (Opacus' DPDataLoader, which though takes int(1/q) steps,
one fewer for some ⌈n/B⌉), per-sample clipping to C, Gaussian noise σ·C and the sum divided
by ⌊q·n⌋; the steps actually taken are what the ledger records. The shipped
models, and any built of the layers clients.bookkeeping supports, run it through that
module (the same steps in one backward pass); the others run it through Opacus' grad-sample
modes (`dp_path` picks, or `train.dp-path` says). Both paths draw the rows of every step and
the noise from one `Randomness` (common.privacy.randomness): seeded for simulation, secure
(OS entropy) for a deployed client, which must not use a seed the server could know.

Training runs on a device (`train.device`, common.device): the model and the client's rows
move there for the steps, and the model comes back to where it was. The draws do not move:
a `Randomness` draws on the CPU, and each step's rows and noise are copied to the device
where they are used (here, in `_use_randomness` and in clients.bookkeeping).

Trade-off of drawing on the CPU and copying, rather than drawing on the GPU: seeded, a GPU
run takes the very rows and noise a CPU run of the same seed takes (torch's CPU generator;
a CUDA generator seeded alike is another algorithm, Philox, and would draw other numbers),
so the two differ only by the rounding of the gradient arithmetic; and secure noise stays
the ChaCha20 stream keyed from OS entropy (common.privacy.randomness) that a CPU run uses,
with no GPU generator to vet. The price: each step draws its noise, one number per trained
parameter, on one CPU thread and copies it to the GPU. For the shipped models (≤ 10⁵
parameters) that is well under a millisecond; for a model of many millions of parameters it
would dominate a GPU step, and a CUDA generator would be the faster choice for seeded
noise.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from privet.clients.bookkeeping import BookkeepingDPSGD
from privet.clients.sgd import SGD, add_proximal_term
from privet.common.losses import TaskLoss, task_loss
from privet.common.opacus_import import opacus
from privet.common.privacy.randomness import Randomness, SeededRandomness

ONE_PASS = "one-pass"  # privet's one-pass DP-SGD (clients.bookkeeping), not an Opacus mode
BOOKKEEPING = ONE_PASS  # its older name; grad_sample_mode "bookkeeping" still means it
AUTO = "auto"
DP_PATHS = (AUTO, ONE_PASS, "hooks", "ghost")  # what `train.dp-path` may say
# Opacus' mode where nothing was measured (dp_path without an example): hooks handles every
# layer it has a grad sampler for and falls back to functorch for the rest; ghost clipping
# refuses tied weights.
OPACUS_MODE = "hooks"
MEASURED_STEPS = 5  # timed steps of each Opacus mode, after one warm-up step


def dp_path(model: nn.Module, requested: str = AUTO, *, example: torch.Tensor | None = None,
            batch_size: int = 64) -> str:
    """How DP-SGD computes the clipped gradients of `model`, from `train.dp-path`
    (`requested`): "one-pass" (privet's book-keeping, clients.bookkeeping; ValueError for a
    model it does not support), "hooks" or "ghost" (Opacus), or "auto":

    - "one-pass" where `clients.bookkeeping.supports(model)` and, given `example` (a batch
      of inputs: only its shape and dtype are read), one step on made-up rows shaped like it
      runs (a forward pass that changes a layer's output in place, or uses a weight outside
      its layer's call, does not: `_one_pass_runs`);
    - else, given `example`, the Opacus mode (hooks or ghost) measured fastest for this
      model on zeros shaped like `example` at `batch_size` rows: a few steps of each on a
      copy, once per process, model and device (`_MEASURED`), drawing nothing from the run's
      randomness and leaving torch's global generators as they were; without `example`,
      `OPACUS_MODE`.

    Both probes run on `example`'s device, where `model` must be too.

    Every path takes the same steps with the same noise: the choice changes how the clipped
    sum is computed (and its rounding), never the sampling, the noise or the ε.

    Trade-off of measuring (rather than a fixed rule): no simple rule picks the faster Opacus
    mode. On Adult (experiments/bench_dpsgd.py, batch 64) ghost clipping beat hooks on the
    MLP (3.7 vs 4.7 ms a step) and the residual MLP (8.1 vs 10.2) but lost on logistic
    regression (2.5 vs 1.9) and the embedding MLP (8.6 vs 6.2): ghost pays a second backward
    pass and builds per-example gradients anyway for layers without a norm sampler (all but
    Linear and Embedding), hooks builds every Linear's. The choice is worth up to ~1.5× a
    step. The price: ~0.1 s per process and model (timed here, beyond Opacus' import and
    first use, which its path pays anyway), and that two processes or two runs may pick
    different modes on a loaded machine; their results then agree to rounding (~1e-6 a
    step), not bit for bit. Set `train.dp-path` to "hooks" or "ghost" where bit-for-bit
    repeats matter. Models on the one-pass path are unaffected."""
    from privet.clients.bookkeeping import unsupported
    requested = ONE_PASS if requested == "bookkeeping" else requested
    if requested == ONE_PASS:
        refused = unsupported(model)
        if refused:
            raise ValueError(f"train.dp-path = \"one-pass\" cannot train this model: "
                             f"{refused}; use \"auto\", \"hooks\" or \"ghost\"")
        return ONE_PASS
    if requested != AUTO:
        return requested
    if unsupported(model) is None:
        runs = True if example is None else _one_pass_runs(model, example)
        if runs is True:
            return ONE_PASS
        if runs == "outside":
            # a weight used outside its layer's call: hooks drops that part of its gradient
            # (consistently: the clipped sum stays within C per example), ghost clipping
            # would add it after computing norms without it; never ghost then
            return "hooks"
    if example is None:
        return OPACUS_MODE
    key = _signature(model, example, batch_size)
    if key not in _MEASURED:
        _MEASURED[key] = _fastest_opacus_mode(model, example, batch_size)
    return _MEASURED[key]


_MEASURED: dict[tuple, str] = {}  # (model, input, batch) → Opacus mode; also the probes


def _signature(model: nn.Module, example: torch.Tensor, batch_size: int) -> tuple:
    return (type(model).__module__, type(model).__qualname__, repr(model),
            tuple((name, tuple(p.shape), p.requires_grad)
                  for name, p in model.named_parameters()),
            tuple(example.shape[1:]), example.dtype, batch_size, str(example.device))


def _rng_kept(device: torch.device):
    """torch.random.fork_rng for the CPU's generator and, on a GPU, that device's: a probe
    that draws (dropout) leaves the run's streams as they were."""
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


class _NoUpdate:
    def step(self) -> None:
        pass


def _one_pass_runs(model: nn.Module, example: torch.Tensor) -> bool | str:
    """Whether a one-pass step runs on a copy of `model`, which includes its check that the
    formulas see every use of the parameters (clients.bookkeeping), on 4 rows shaped like
    `example`: uniform in [0, 1) for a float input (integer codes stored as floats become
    0), zeros for an integer one (valid indices). True, or "outside" when a parameter is
    used outside its layer's call, else False. Once per process and model."""
    key = ("one-pass runs", *_signature(model, example, 4))
    if key not in _MEASURED:
        from privet.clients.bookkeeping import BookkeepingDPSGD, UsedOutsideItsLayer
        shape = (4, *example.shape[1:])
        x = (torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(example.dtype)
             if example.is_floating_point() else torch.zeros(shape, dtype=example.dtype))
        x = x.to(example.device)
        with _rng_kept(example.device):
            try:
                BookkeepingDPSGD(copy.deepcopy(model), _NoUpdate(), noise_multiplier=0.0,
                                 max_grad_norm=1.0, expected_batch_size=1,
                                 randomness=SeededRandomness(0)).step(
                    x, torch.zeros(4, dtype=torch.int64, device=example.device))
                _MEASURED[key] = True
            except UsedOutsideItsLayer:
                _MEASURED[key] = "outside"
            except Exception:  # noqa: BLE001 - any failure: Opacus' turn
                _MEASURED[key] = False
    return _MEASURED[key]


def _fastest_opacus_mode(model: nn.Module, example: torch.Tensor, batch_size: int) -> str:
    """The Opacus mode, hooks or ghost, whose DP-SGD step on `batch_size` rows of zeros
    shaped like `example` took least time (the fastest of `MEASURED_STEPS` interleaved steps
    of each, after a warm-up), on copies of `model`; a mode that fails is not a candidate
    (ghost refuses tied weights); `OPACUS_MODE` when both fail."""
    x = torch.zeros((batch_size, *example.shape[1:]), dtype=example.dtype, device=example.device)
    y = torch.zeros(batch_size, dtype=torch.int64, device=example.device)
    steppers, best = {}, {}
    with _rng_kept(example.device), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for mode in ("hooks", "ghost"):
            try:
                net, optimizer, criterion = _make_private(
                    copy.deepcopy(model), TensorDataset(x, y), batch_size=batch_size, lr=0.0,
                    momentum=0.0, noise_multiplier=1.0, max_grad_norm=1.0,
                    grad_sample_mode=mode)
                _use_randomness(optimizer, SeededRandomness(0), expected_batch_size=batch_size)
                steppers[mode] = (net, optimizer, criterion)
                _opacus_step(net, optimizer, criterion, x, y)  # warm-up; may fail
            except Exception:  # noqa: BLE001 - a mode that cannot train this model
                steppers.pop(mode, None)
        for _ in range(MEASURED_STEPS):
            for mode, stepper in steppers.items():
                start = time.perf_counter()
                _opacus_step(*stepper, x, y)
                _synchronize(example.device)  # a GPU's step is done when it says so
                best[mode] = min(best.get(mode, math.inf), time.perf_counter() - start)
        for net, _, _ in steppers.values():
            net._close()
    return min(best, key=best.get) if best else OPACUS_MODE


def _opacus_step(net: nn.Module, dp_optimizer, criterion, x: torch.Tensor, y: torch.Tensor
                 ) -> None:
    dp_optimizer.zero_grad(set_to_none=True)
    criterion(net(x), y).backward()
    dp_optimizer.step()


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs it asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class LocalResult:
    loss: float       # mean training loss over the examples the steps used (`loss`'s units)
    accuracy: float   # NaN for regression
    steps: int
    examples: int
    seconds: float
    dp_path: str = ""  # how DP-SGD computed the clipped gradients ("" without DP-SGD)


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
                proximal_mu: float = 0.0, loss: str = "cross-entropy",
                device: str | torch.device = "cpu") -> LocalResult:
    """Train `model` in place. With `noise_multiplier` set, this is DP-SGD, computed by
    privet's one-pass path (grad_sample_mode "one-pass", or "bookkeeping"), by Opacus (its
    modes "hooks", "ghost", "functorch", "ew"), or by the one `dp_path` picks for "auto"
    (on this model, the shape of `features` and `batch_size`); `LocalResult.dp_path` says
    which.

    `loss` (common.losses): "cross-entropy" for `labels` (N,) int64 classes and a model with
    one logit per class; "mse" or "huber" for `labels` (N,) float32 scaled targets and a
    model with one output. `features` (N, ...) float32.

    `randomness` supplies every DP draw: which rows each step takes and the Gaussian noise.
    None means `SeededRandomness(seed)` (rows from a generator seeded with `seed`, noise from
    one seeded with `seed + 1`), reproducible and fit for simulation only. Non-private
    training ignores it: its shuffling, seeded with `seed`, protects nothing.

    `proximal_mu` > 0 is FedProx: each step adds μ·(w − w_start) to the (noised) gradient,
    w_start being the weights `model` has now (clients.sgd.add_proximal_term).

    `device` (a torch device or its name: "cpu", "cuda", "cuda:N"; common.device resolves
    `train.device`) is where the steps run: `model` and the rows move there for them, and
    `model` moves back to the device it was on before returning (or raising). The rows of
    each step and the noise are drawn on the CPU as on a CPU run and copied to `device`
    (see the module doc); on the CPU nothing moves. On a GPU, seeded runs repeat to
    rounding, not bit for bit (some CUDA kernels sum in a varying order), and dropout draws
    from the GPU's generator, seeded with `seed` too. `LocalResult.seconds` includes the
    copies."""
    start = time.perf_counter()
    device = torch.device(device)
    home = next(model.parameters(), torch.empty(0)).device
    if device.type == "cpu":  # the same CPU stream; torch.manual_seed also queues CUDA's
        torch.default_generator.manual_seed(seed)  # lazy seeding, capturing a stack trace
    else:  # (~0.1 ms a call, every message)
        torch.manual_seed(seed)
    x_all = torch.from_numpy(features).to(device)
    y_all = torch.from_numpy(labels).to(device)
    tally = _Tally()
    model.to(device)
    model.train()
    try:
        if noise_multiplier is None:
            _train_plain(model, x_all, y_all, tally, epochs=epochs, batch_size=batch_size,
                         lr=lr, momentum=momentum, seed=seed, proximal_mu=proximal_mu,
                         loss=loss)
        else:
            randomness = randomness if randomness is not None else SeededRandomness(seed)
            batches = (rows.to(device) for rows in _poisson_batches(
                randomness, len(y_all), batch_size, epochs))
            dp = dict(randomness=randomness, lr=lr, momentum=momentum,
                      noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                      proximal_mu=proximal_mu, loss=loss)
            grad_sample_mode = dp_path(model, grad_sample_mode, example=x_all[:1],
                                       batch_size=batch_size)
            if grad_sample_mode == ONE_PASS:
                _train_bookkeeping(model, x_all, y_all, tally, batches,
                                   expected_batch_size=expected_batch_size(len(y_all),
                                                                           batch_size),
                                   **dp)
            else:
                _train_opacus(model, x_all, y_all, tally, batches, batch_size=batch_size,
                              grad_sample_mode=grad_sample_mode, **dp)
    finally:
        model.to(home)
    return LocalResult(loss=tally.loss_sum / max(tally.seen, 1),
                       accuracy=tally.correct / max(tally.seen, 1) if loss == "cross-entropy"
                       else math.nan, steps=tally.steps,
                       examples=len(labels), seconds=time.perf_counter() - start,
                       dp_path="" if noise_multiplier is None else grad_sample_mode)


def _train_plain(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, tally: _Tally,
                 *, epochs: int, batch_size: int, lr: float, momentum: float,
                 seed: int, proximal_mu: float = 0.0, loss: str = "cross-entropy") -> None:
    """Non-private SGD over shuffled batches: the batches torch's shuffling DataLoader with a
    generator seeded `seed` gives, draw for draw (its RandomSampler also draws a second,
    empty-sliced permutation an epoch), without its per-row collation."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = SGD(model.parameters(), lr=lr, momentum=momentum)
    add_proximal_term(optimizer, optimizer.params, proximal_mu)
    for _ in range(epochs):
        _start_dataloader_epoch(generator)
        order = torch.randperm(len(y_all), generator=generator).to(y_all.device)
        torch.randperm(len(y_all), generator=generator)
        for batch in order.split(batch_size):
            x, y = x_all[batch], y_all[batch]
            optimizer.zero_grad(set_to_none=True)
            out = model(x)
            batch_loss = task_loss(loss, out, y)
            batch_loss.backward()
            optimizer.step()
            tally.add(out.detach(), batch_loss.detach() * len(y), y)


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
        is not empty; regression (float `y`) counts no correct answers."""
        self.steps += 1
        if len(y):
            self.seen += len(y)
            self.loss_sum += float(loss_sum)
            if not y.is_floating_point():
                self.correct += int((out.argmax(1) == y).sum())


def _train_bookkeeping(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor,
                       tally: _Tally, batches: Iterator[torch.Tensor], *,
                       randomness: Randomness, expected_batch_size: int, lr: float,
                       momentum: float, noise_multiplier: float, max_grad_norm: float,
                       proximal_mu: float = 0.0, loss: str = "cross-entropy") -> None:
    """DP-SGD by clients.bookkeeping, one step a batch of row indices."""
    optimizer = SGD(model.parameters(), lr=lr, momentum=momentum)
    dpsgd = BookkeepingDPSGD(
        model, add_proximal_term(optimizer, optimizer.params, proximal_mu),
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size, randomness=randomness, loss=loss)
    for rows in batches:
        y = y_all[rows]
        out, loss_sum = dpsgd.step(x_all[rows], y)
        tally.add(out, loss_sum, y)


def _train_opacus(model: nn.Module, x_all: torch.Tensor, y_all: torch.Tensor, tally: _Tally,
                  batches: Iterator[torch.Tensor], *, batch_size: int, grad_sample_mode: str,
                  randomness: Randomness, lr: float, momentum: float, noise_multiplier: float,
                  max_grad_norm: float, proximal_mu: float = 0.0,
                  loss: str = "cross-entropy") -> None:
    """DP-SGD by Opacus' `grad_sample_mode`, on privet's batches and with privet's noise.

    Opacus computes the per-sample gradients, clips and sums them and scales the noisy sum;
    the rows of each step come from `batches` (not Opacus' DPDataLoader) and the noise from
    `randomness` (not a torch.Generator; see `_use_randomness`). An empty batch is a step of
    noise alone, as in Opacus."""
    net, dp_optimizer, criterion = _make_private(
        model, TensorDataset(x_all, y_all), batch_size=batch_size, lr=lr, momentum=momentum,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        grad_sample_mode=grad_sample_mode, loss=loss)
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
        if len(y) or grad_sample_mode not in ("ew", "ghost"):
            out = net(x)
            loss = criterion(out, y)
            loss.backward()
            _one_gradient_per_example(dp_optimizer, len(y))
            tally.add(out.detach(), loss.detach() * len(y), y)
        else:  # torch's ExpandedWeights refuses a batch of 0 rows, ghost's Embedding too
            _no_per_sample_gradients(dp_optimizer, grad_sample_mode)
            tally.add(None, None, y)
        dp_optimizer.step()
    net._close()  # remove Opacus hooks so `model` is a plain module again


def _make_private(model: nn.Module, dataset: TensorDataset, *, batch_size: int, lr: float,
                  momentum: float, noise_multiplier: float, max_grad_norm: float,
                  grad_sample_mode: str, loss: str = "cross-entropy"
                  ) -> tuple[nn.Module, object, nn.Module]:
    """Opacus' PrivacyEngine.make_private for `model` and torch's SGD: (its GradSampleModule,
    its DPOptimizer, the loss to call: `loss` as a mean-reduced criterion, which ghost
    clipping wraps). The DPDataLoader
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
            module=model, optimizer=optimizer, criterion=TaskLoss(loss),
            data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True,
            grad_sample_mode=grad_sample_mode)
    if len(private) == 4:  # ghost clipping also wraps the loss
        net, dp_optimizer, criterion, _ = private
    else:
        (net, dp_optimizer, _), criterion = private, TaskLoss(loss)
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
#   the other modes' backward passes leave, and in mode "ghost" a zero p.grad (its
#   Embedding norm sampler cannot reshape 0 rows), so the optimizer takes its step of noise
#   alone.
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
        for p in dp_optimizer.params:  # drawn on the CPU, copied to a GPU (the module doc)
            p.grad.add_(randomness.gaussian(p.grad.shape, std, p.grad.dtype).to(p.grad.device))

    dp_optimizer.add_noise = add_noise


def _one_gradient_per_example(dp_optimizer, examples: int) -> None:
    """Raises ValueError unless Opacus computed one per-sample gradient (hooks, functorch,
    ew: `p.grad_sample`) or gradient norm (ghost: `p._norm_sample`) per example of the batch.
    A model that reshapes the batch (B, F) into (B·F, 1) rows inside `forward` gets one per
    row instead: Opacus would clip each row to C, an example's update could reach F·C, and
    the ε computed for C would not hold."""
    if not examples:
        return
    for p in dp_optimizer.params:
        for name in ("grad_sample", "_norm_sample"):
            found = getattr(p, name, None)
            if isinstance(found, torch.Tensor) and found.dim() and found.shape[0] != examples:
                raise ValueError(
                    f"the model computed {found.shape[0]} per-sample gradients for a batch of "
                    f"{examples} examples: its forward pass reshapes or mixes the batch "
                    "dimension, so DP-SGD cannot clip per example and no ε would hold; keep "
                    "the batch as the first dimension, one row per example, in every layer")


def _no_per_sample_gradients(dp_optimizer, grad_sample_mode: str) -> None:
    """What the backward pass of an empty batch leaves `dp_optimizer`'s parameters: per-sample
    gradients of 0 rows (Opacus' grad-sample modes), or in ghost mode, whose optimizer reads
    the clipped sum from p.grad, a zero gradient."""
    for p in dp_optimizer.params:
        if grad_sample_mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))
