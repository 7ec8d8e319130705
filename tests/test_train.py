"""DP-SGD as trained: clipping and noise checked against independent computations."""

import numpy as np
import pytest
import torch
from torch import nn

from privet.clients import bookkeeping, train
from privet.clients.train import (BOOKKEEPING, expected_batch_size, sample_rate, steps_per_epoch,
                           train_local)
from privet.common.config import TrainConfig
from privet.common.models import MODELS, build_model
from privet.common.privacy.randomness import Randomness, SecureRandomness, SeededRandomness

ROWS, FEATURES = 256, 12


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32) * 3
    y = (x[:, 0] + rng.normal(size=ROWS) > 0).astype(np.int64)
    return x, y


def _model(name):
    torch.manual_seed(0)
    return build_model(TrainConfig(model=name, hidden=8), (FEATURES,), 2)


def _clipped_mean_gradient(model, x, y, clip):
    """Per-sample gradients with torch.func, each clipped to `clip`, averaged."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, p, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(
        params, torch.from_numpy(x), torch.from_numpy(y))
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    assert (norms > clip).any(), "the test needs gradients that clipping changes"
    scale = torch.clamp(clip / (norms + 1e-6), max=1.0)
    return {k: (g * scale.view(-1, *[1] * (g.dim() - 1))).mean(0) for k, g in grads.items()}


def test_every_built_in_model_takes_the_one_pass_path():
    assert set(MODELS) == {"mlp", "logreg", "cnn"}
    assert all(train.dp_path(build_model(TrainConfig(model=name), (1, 8, 8), 10)) == BOOKKEEPING
               for name in MODELS)
    assert train.dp_path(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))) == BOOKKEEPING
    assert train.dp_path(nn.Sequential(nn.Linear(3, 3), nn.PReLU())) == "hooks"


@pytest.mark.parametrize("name", ["mlp", "logreg"])
@pytest.mark.parametrize("mode", [BOOKKEEPING, "hooks", "ghost"])
def test_update_is_the_mean_of_clipped_per_sample_gradients(name, mode):
    x, y = _data()
    model, clip, lr = _model(name), 0.5, 1.0
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    expected = _clipped_mean_gradient(model, x, y, clip)
    # batch = all rows: q = 1, one step, so Poisson sampling takes every row
    train_local(model, x, y, epochs=1, batch_size=ROWS, lr=lr, momentum=0.0, seed=1,
                noise_multiplier=1e-9, max_grad_norm=clip, grad_sample_mode=mode)
    for key, value in model.named_parameters():
        step = (before[key] - value.detach()) / lr
        assert torch.allclose(step, expected[key], atol=1e-5), key


@pytest.mark.parametrize("source", ["seeded", "secure"])
@pytest.mark.parametrize("batch_size", [ROWS, 100])
@pytest.mark.parametrize("mode", [BOOKKEEPING, "hooks", "ghost"])
def test_noise_has_the_calibrated_standard_deviation(mode, batch_size, source):
    """Inputs of zero give zero first-layer gradients: its update is the noise alone, σC
    divided by the expected batch ⌊q·n⌋ on each coordinate, each step (q = 1: one step of
    every row; batch 100: q = 1/3, 3 steps, divided by 85)."""
    x = np.zeros((ROWS, FEATURES), dtype=np.float32)
    y = np.zeros(ROWS, dtype=np.int64)
    model, sigma, clip, lr = build_model(TrainConfig(hidden=512), (FEATURES,), 2), 1.3, 0.7, 1.0
    before = model[1].weight.detach().clone()
    randomness = SecureRandomness() if source == "secure" else None
    result = train_local(model, x, y, epochs=1, batch_size=batch_size, lr=lr, momentum=0.0,
                         seed=3, noise_multiplier=sigma, max_grad_norm=clip,
                         grad_sample_mode=mode, randomness=randomness)
    change = (model[1].weight.detach() - before).flatten().numpy()
    batch = expected_batch_size(ROWS, batch_size)
    assert (batch, result.steps) == ((ROWS, 1) if batch_size == ROWS else (85, 3))
    # each step: noise σC on the sum, divided by the expected batch; the steps' noises add
    expected = lr * sigma * clip / batch * np.sqrt(result.steps)
    assert change.size == 512 * FEATURES
    # std of 6,144 normal draws: relative standard error ≈ 0.9%; allow 5%
    assert change.std() == pytest.approx(expected, rel=0.05)
    assert abs(change.mean()) < 4 * expected / np.sqrt(change.size)


@pytest.mark.parametrize("mode", [BOOKKEEPING, "hooks"])
def test_steps_and_rate_follow_opacus_poisson_loader(mode):
    x, y = _data()
    result = train_local(_model("logreg"), x, y, epochs=2, batch_size=100, lr=0.1,
                         momentum=0.0, seed=0, noise_multiplier=1.0, max_grad_norm=1.0,
                         grad_sample_mode=mode)
    assert steps_per_epoch(ROWS, 100) == 3 and sample_rate(ROWS, 100) == 1 / 3
    assert result.steps == 2 * 3 and result.examples == ROWS


@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch", "ew"])
@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_bookkeeping_takes_the_steps_opacus_takes(name, mode):
    """Same seed: the same Poisson batches, clipping and noise as Opacus' own DP-SGD, so the
    same model after an epoch of small batches (some of them empty) with real noise."""
    x, y = _data()
    trained = {}
    for path in (BOOKKEEPING, mode):
        model = _model(name)
        result = train_local(model, x, y, epochs=2, batch_size=4, lr=0.1, momentum=0.5,
                             seed=7, noise_multiplier=0.8, max_grad_norm=0.3,
                             grad_sample_mode=path)
        trained[path] = (result, [p.detach() for p in model.parameters()])
    (ours, ours_params), (opacus, opacus_params) = trained[BOOKKEEPING], trained[mode]
    assert ours.steps == opacus.steps == 2 * 64
    assert ours.accuracy == opacus.accuracy
    assert ours.loss == pytest.approx(opacus.loss, rel=1e-5)
    for a, b in zip(ours_params, opacus_params):
        assert torch.allclose(a, b, atol=1e-5)


def test_opacus_path_takes_every_step_of_an_epoch():
    """⌈n/B⌉ = 93 steps at q = 1/93: Opacus' DPDataLoader would take int(1/q) = 92 and divide
    by ⌊n/92⌋; both paths take the 93 steps the ledger records and divide by ⌊n/93⌋."""
    rows = 186
    assert int(1 / sample_rate(rows, 2)) == 92 and steps_per_epoch(rows, 2) == 93
    x, y = _data()
    x, y = x[:rows], y[:rows]
    trained = {}
    for mode in (BOOKKEEPING, "hooks"):
        model = _model("mlp")
        result = train_local(model, x, y, epochs=1, batch_size=2, lr=0.1, momentum=0.0,
                             seed=3, noise_multiplier=0.5, max_grad_norm=1.0,
                             grad_sample_mode=mode)
        trained[mode] = (result.steps, [p.detach() for p in model.parameters()])
    assert trained[BOOKKEEPING][0] == trained["hooks"][0] == 93
    for a, b in zip(trained[BOOKKEEPING][1], trained["hooks"][1]):
        assert torch.allclose(a, b, atol=1e-5)


def _trained_weights(mode, randomness, seed=7, batch_size=16, sigma=0.8):
    x, y = _data()
    model = _model("mlp")
    train_local(model, x, y, epochs=1, batch_size=batch_size, lr=0.1, momentum=0.5,
                seed=seed, noise_multiplier=sigma, max_grad_norm=0.5, grad_sample_mode=mode,
                randomness=randomness)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", [BOOKKEEPING, "hooks", "ghost"])
@pytest.mark.parametrize("drawn", ["noise", "rows", "both"])
def test_secure_randomness_gives_different_models_seeded_the_same(mode, drawn):
    """Same model, data and seed: secure draws differ run to run (the server cannot replay
    them); seeded ones repeat, and None is SeededRandomness(seed). "noise": q = 1, so every
    step takes every row; "rows": σ = 0, so only the Poisson sampling is random."""
    kwargs = {"noise": dict(batch_size=ROWS), "rows": dict(sigma=0.0), "both": {}}[drawn]
    secure = [_trained_weights(mode, SecureRandomness(), **kwargs) for _ in range(2)]
    assert not torch.allclose(secure[0], secure[1], atol=1e-4)
    seeded = [_trained_weights(mode, None, **kwargs), _trained_weights(mode, None, **kwargs),
              _trained_weights(mode, SeededRandomness(7), **kwargs)]
    assert torch.equal(seeded[0], seeded[1]) and torch.equal(seeded[0], seeded[2])


class _Recording(Randomness):
    """Delegates to `inner`, recording each call."""

    kind = "recording"

    def __init__(self, inner: Randomness):
        self.inner, self.calls = inner, []

    def start_epoch(self):
        self.calls.append(("start_epoch",))
        self.inner.start_epoch()

    def poisson_masks(self, steps, rows, rate):
        self.calls.append(("poisson_masks", steps, rows, rate))
        return self.inner.poisson_masks(steps, rows, rate)

    def gaussian(self, shape, std, dtype=torch.float32):
        self.calls.append(("gaussian", tuple(shape), std, dtype))
        return self.inner.gaussian(shape, std, dtype)

    def gaussian_numpy(self, shape, std):
        raise AssertionError("DP-SGD draws torch tensors")

    def uniform(self, size):
        raise AssertionError("DP-SGD samples rows with poisson_masks")


@pytest.mark.parametrize("mode", [BOOKKEEPING, "hooks", "ghost"])
def test_every_dp_draw_comes_from_the_randomness(mode):
    """Given a Randomness, the DP path draws nothing from `seed` (seed 12345 with
    SeededRandomness(7) trains the model seed 7 alone does), and each step asks it for its
    rows (at q) and then one noise tensor per parameter, in parameter order, of std σC
    (Opacus, which divides later) or σC/⌊q·n⌋ (book-keeping)."""
    recording = _Recording(SeededRandomness(7))
    assert torch.equal(_trained_weights(mode, recording, seed=12345),
                       _trained_weights(mode, None, seed=7))
    steps, rate = steps_per_epoch(ROWS, 16), sample_rate(ROWS, 16)
    shapes = [tuple(p.shape) for p in _model("mlp").parameters()]
    std = 0.8 * 0.5 / (expected_batch_size(ROWS, 16) if mode == BOOKKEEPING else 1)
    step = [("poisson_masks", 1, ROWS, rate)] + [("gaussian", s, std, torch.float32)
                                                  for s in shapes]
    assert recording.calls == [("start_epoch",)] + step * steps


@pytest.mark.parametrize("rate", [0.01, 1 / 3, 0.5, 0.97])
def test_secure_poisson_masks_have_the_requested_rate(rate):
    """Binomial tests at 6 standard errors: the share of rows drawn, and of rows drawn in two
    consecutive steps (rate², as for independent steps)."""
    steps, rows = 50, 4000
    masks = SecureRandomness().poisson_masks(steps, rows, rate)
    assert masks.shape == (steps, rows) and masks.dtype == torch.bool
    for hits, trials, p in [(int(masks.sum()), steps * rows, rate),
                            (int((masks[1:] & masks[:-1]).sum()), (steps - 1) * rows, rate**2)]:
        assert abs(hits - trials * p) < 6 * np.sqrt(trials * p * (1 - p)), (hits, trials, p)
    assert SecureRandomness().poisson_masks(3, 5, 1.0).all()


def test_plain_sgd_takes_the_shuffling_dataloader_batches():
    """Non-private training indexes tensors directly; the steps are those of torch's
    DataLoader, whose draws it mirrors (this fails if a torch release changes them)."""
    x, y = _data()
    model, reference = _model("mlp"), _model("mlp")
    train_local(model, x, y, epochs=2, batch_size=30, lr=0.1, momentum=0.5, seed=4)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y)),
        batch_size=30, shuffle=True, generator=torch.Generator().manual_seed(4))
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.5)
    for _ in range(2):
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(reference(xb), yb).backward()
            optimizer.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        assert torch.equal(a, b)


def test_bookkeeping_takes_the_layers_it_computes_exactly():
    assert all(bookkeeping.supports(build_model(TrainConfig(model=name), (1, 8, 8), 10))
               for name in MODELS)
    assert bookkeeping.supports(nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Dropout()))
    assert not bookkeeping.supports(nn.Sequential(nn.Linear(3, 3), nn.PReLU()))
    assert not bookkeeping.supports(nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)))
    assert not bookkeeping.supports(nn.Sequential(nn.Conv2d(2, 2, 3, padding="same")))
    with pytest.raises(ValueError, match=r"layer '1' \(PReLU\): no one-pass formula"):
        bookkeeping.BookkeepingDPSGD(
            nn.Sequential(nn.Linear(3, 3), nn.PReLU()), None, noise_multiplier=1.0,
            max_grad_norm=1.0, expected_batch_size=1, randomness=SeededRandomness(0))


def test_the_apps_do_not_import_opacus_until_asked():
    """Importing Opacus costs each simulation actor ~1.5 s; the default path never needs it."""
    import subprocess
    import sys

    code = ("import sys, privet.clients.app, privet.server.app, privet.experiments.simulation; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'opacus'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]", out.stdout
