"""The one-pass DP-SGD path beyond Linear stacks: LayerNorm, GroupNorm, Embedding, sequence
inputs, any module tree; its clipped sums against independent per-example gradients, and
the choice of path (`train.dp-path`)."""

import copy

import numpy as np
import pytest
import torch
from test_train import _Recording
from torch import nn

from privet.clients import bookkeeping, train
from privet.clients.train import ONE_PASS, train_local
from privet.common.privacy.randomness import SeededRandomness
from experiments.examples.tabular import CodeEmbeddingMLP, ResidualMLP

class _NoNoise:
    def gaussian(self, shape, std, dtype=torch.float32):
        return torch.zeros(shape, dtype=dtype)


class _NoUpdate:
    def step(self):
        pass


def one_pass_sum(model, x, y, clip):
    """The one-pass path's clipped sum Σ_i c_i ∇_i (no noise, divided by 1), by parameter name."""
    dpsgd = bookkeeping.BookkeepingDPSGD(model, _NoUpdate(), noise_multiplier=0.0,
                                         max_grad_norm=clip, expected_batch_size=1,
                                         randomness=_NoNoise())
    dpsgd.step(x, y)
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def _clipped_sum(per_example):
    """(Σ_i c_i ∇_i, C) with C the median per-example norm: half the examples clipped."""
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_example.values()))
    clip = float(norms.median())
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    assert (factors < 1).any() and (factors == 1).any()
    return {k: (g * factors.view(-1, *[1] * (g.dim() - 1))).sum(0)
            for k, g in per_example.items()}, clip


def vmap_sum(model, x, y):
    """Per-example gradients by torch.func (vmap of grad), clipped and summed; and the clip."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}

    def loss(p, xi, yi):
        out = torch.func.functional_call(model, {**p, **frozen}, (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(out, yi.unsqueeze(0))

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return _clipped_sum(grads)


def loop_sum(model, x, y):
    """Per-example gradients by one ordinary backward pass per example, clipped and summed;
    and the clip."""
    trained = {k: p for k, p in model.named_parameters() if p.requires_grad}
    per_example = {k: [] for k in trained}
    for i in range(len(y)):
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for k, p in trained.items():
            per_example[k].append(p.grad.clone() if p.grad is not None
                                  else torch.zeros_like(p))
    model.zero_grad(set_to_none=True)
    return _clipped_sum({k: torch.stack(v) for k, v in per_example.items()})


def check(model, x, y, reference=vmap_sum, atol=1e-9):
    """The one-pass clipped sum equals `reference`'s, at a clip half the examples exceed; in
    float64, where both are exact to rounding (float32 rounding alone differs by ~1e-5)."""
    model.double()
    x = x.double() if x.is_floating_point() else x
    # on a copy: functional_call can leave a module reached by two names a new Parameter
    expected, clip = reference(copy.deepcopy(model), x, y)
    ours = one_pass_sum(model, x, y, clip)
    assert ours.keys() == expected.keys()
    for k in ours:
        assert torch.allclose(ours[k], expected[k], atol=atol), (
            k, float((ours[k] - expected[k]).abs().max()))
    return ours


class Residual(nn.Module):
    """A non-Sequential tree: residual addition, a frozen-free nested block."""

    def __init__(self, d=6, h=8, c=3):
        super().__init__()
        self.inp = nn.Linear(d, h)
        self.block = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.Tanh())
        self.out = nn.Linear(h, c)

    def forward(self, x):
        h = self.inp(x)
        return self.out(h + self.block(h))


class Sequence(nn.Module):
    """(B, T, D) inputs: a Linear over every position (summed over T in its per-example
    gradient), LayerNorm over the last dim, another over (T, H), then a head."""

    def __init__(self, t=5, d=6, h=8, c=3, both=False):
        super().__init__()
        self.t, self.d = t, d
        self.proj = nn.Linear(d, h)
        self.norm = nn.LayerNorm((t, h) if both else h)
        self.head = nn.Linear(t * h, c)

    def forward(self, x):
        h = torch.tanh(self.norm(self.proj(x.view(-1, self.t, self.d))))
        return self.head(h.flatten(1))


class Twice(nn.Module):
    """One Linear called twice per forward pass, and a module reached by two names."""

    def __init__(self, d=6, c=3):
        super().__init__()
        self.shared = nn.Linear(d, d)
        self.alias = self.shared
        self.head = nn.Linear(d, c)

    def forward(self, x):
        return self.head(torch.tanh(self.alias(torch.tanh(self.shared(x)))))


def _conv_groupnorm():
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 8),
                         nn.GroupNorm(4, 8), nn.ELU(), nn.Linear(8, 3))


def _frozen():
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(False)
    model[1].bias.requires_grad_(False)
    return model


MODELS = {
    "layernorm": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.GELU(),
                                        nn.Linear(8, 3)), (6,)),
    "layernorm-no-bias": (lambda: nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8, bias=False),
                                                nn.Linear(8, 3)), (6,)),
    "groupnorm": (_conv_groupnorm, (2, 6, 6)),
    "residual": (Residual, (6,)),
    "residual_mlp": (lambda: ResidualMLP(6, 3, 8, dropout=0.0), (6,)),
    "sequence-built": (lambda: Sequence(), (5 * 6,)),  # T(D+O) = 70 ≥ DO = 48: built
    "sequence-2d-norm": (lambda: Sequence(both=True), (5 * 6,)),
    "sequence-gram": (lambda: Sequence(t=3, d=16, h=16), (3 * 16,)),  # 96 < 256: Gram
    "linear-twice": (Twice, (6,)),
    "frozen": (_frozen, (6,)),
}


@pytest.mark.parametrize("name", MODELS)
def test_one_pass_clipped_sum_is_that_of_per_example_gradients(name):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make()
    assert bookkeeping.supports(model), bookkeeping.unsupported(model)
    x, y = torch.randn(24, *shape) * 2, torch.randint(0, 3, (24,))
    check(model, x, y)


@pytest.mark.parametrize("positions", [1, 4, 40])  # T = 1, the Gram form, grouped by sort
@pytest.mark.parametrize("padding", [None, 0])
def test_embedding_with_repeated_rows_and_padding(positions, padding):
    """Few rows, many lookups: rows repeat within an example (their gradients add before the
    norm), and padding_idx rows get no gradient; checked against one backward pass per
    example (torch's own embedding backward)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Embedding(5, 4, padding_idx=padding), nn.Flatten(),
                          nn.Linear(4 * positions, 3))
    x = torch.randint(0, 5, (20, positions))
    x[0] = 0  # with padding: an example that is all padding has no embedding gradient
    y = torch.randint(0, 3, (20,))
    if positions > 1:
        assert any(len(set(row.tolist())) < positions for row in x)
    ours = check(model, x, y, loop_sum)
    if padding is not None:
        assert torch.equal(ours["0.weight"][padding], torch.zeros(4))


def test_embedding_mlp_example():
    torch.manual_seed(2)
    model = CodeEmbeddingMLP([3, 5, 2], numeric=4, outputs=2, hidden=8, dropout=0.0)
    codes = torch.stack([torch.randint(0, n, (32,)) for n in (3, 5, 2)], 1).float()
    x = torch.cat([codes, torch.randn(32, 4)], 1)
    y = torch.randint(0, 2, (32,))
    assert bookkeeping.supports(model)
    check(model, x, y, loop_sum)


@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize("sizes", [dict(t=5, d=6, h=8), dict(t=3, d=16, h=16)])
def test_both_forms_of_a_linear_norm_on_sequences(monkeypatch, gram, sizes):
    """A Linear on (B, T, D): its per-example norm by the Gram form or by building the
    gradient (each model above takes one by cost; here both are forced)."""
    monkeypatch.setattr(bookkeeping._LinearGrads, "GRAM", gram)
    torch.manual_seed(3)
    model = Sequence(**sizes)
    x, y = torch.randn(16, sizes["t"] * sizes["d"]), torch.randint(0, 3, (16,))
    check(model, x, y)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        h = self.a(x)
        h += 1.0  # changes the Linear's output after its hook saw it
        return self.b(h)


@pytest.mark.parametrize("model, why", [
    (Tied(), "shared with layer 'a' (tied weights)"),
    (nn.Sequential(nn.Linear(4, 4), nn.PReLU()), "PReLU): no one-pass formula"),
    (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, affine=False)),
     "BatchNorm1d): not a known per-example layer"),
    (nn.Sequential(nn.Linear(4, 4), nn.Softmax(dim=0)), "Softmax): not a known per-example"),
    (nn.Sequential(nn.Linear(4, 4), nn.Flatten(0)), "Flatten): not a known per-example"),
    (nn.Sequential(nn.Embedding(4, 4, max_norm=1.0)), "max_norm"),
    (nn.Sequential(nn.Embedding(4, 4, scale_grad_by_freq=True)), "scale_grad_by_freq"),
    (nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), "grouped convolution"),
    (nn.LSTM(4, 4), "LSTM): no one-pass formula"),
])
def test_what_the_one_pass_path_refuses_goes_to_opacus(model, why):
    assert why in bookkeeping.unsupported(model)
    assert train.dp_path(model) == "hooks"
    with pytest.raises(ValueError, match="cannot train this model"):
        train.dp_path(model, "one-pass")


def test_frozen_layers_and_parameter_free_norms_are_fine():
    frozen = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.Linear(4, 2))
    frozen[1].weight.requires_grad_(False)  # a frozen layer of no formula: still refused
    assert "PReLU" in bookkeeping.unsupported(frozen)
    plain = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4, elementwise_affine=False),
                          nn.GroupNorm(2, 4, affine=False), nn.Linear(4, 2))
    assert bookkeeping.supports(plain)
    assert bookkeeping.supports(nn.Sequential(nn.Linear(4, 2), nn.ModuleList(), nn.Softmax(1)))
    nothing = nn.Sequential(nn.Linear(4, 2))
    nothing[0].requires_grad_(False)
    assert bookkeeping.unsupported(nothing) == "nothing to train"


def test_a_forward_pass_that_changes_a_layer_output_in_place_is_refused_not_mistrained():
    model = InPlace()
    assert bookkeeping.supports(model)  # not visible statically
    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with pytest.raises(ValueError, match="in place"):
        one_pass_sum(model, x, y, 1.0)
    # auto probes one step first, and gives such a model to Opacus
    assert train.dp_path(model, example=x) in ("hooks", "ghost")


def _data(rows=96, features=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, features)).astype(np.float32) * 2
    y = (x[:, 0] + rng.normal(size=rows) > 0).astype(np.int64)
    return x, y


def _train(make, mode, randomness=None, **kwargs):
    torch.manual_seed(0)
    model = make()
    x, y = _data()
    result = train_local(model, x, y, epochs=1, batch_size=16, lr=0.1, momentum=0.5, seed=5,
                         noise_multiplier=0.7, max_grad_norm=0.3, grad_sample_mode=mode,
                         randomness=randomness, **kwargs)
    return result, torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_residual_mlp_one_pass_takes_opacus_steps(mode):
    """Same seed, real noise, Poisson batches: the one-pass path and Opacus end at the same
    weights (Dropout off: its masks are drawn differently by the two)."""
    make = lambda: ResidualMLP(6, 2, 8, dropout=0.0)  # noqa: E731
    (ours, ours_w), (theirs, theirs_w) = _train(make, ONE_PASS), _train(make, mode)
    assert ours.dp_path == ONE_PASS and theirs.dp_path == mode
    assert ours.steps == theirs.steps
    assert torch.allclose(ours_w, theirs_w, atol=1e-5)


class Leftover(nn.Module):
    """A model the one-pass path leaves to Opacus (PReLU), non-Sequential, with LayerNorm."""

    def __init__(self):
        super().__init__()
        self.a, self.norm, self.act, self.b = (nn.Linear(6, 8), nn.LayerNorm(8), nn.PReLU(),
                                               nn.Linear(8, 2))

    def forward(self, x):
        return self.b(self.act(self.norm(self.a(x))))


def test_ghost_clipping_gives_the_clipped_sum_hooks_gives():
    """Opacus' ghost clipping (its own loss wrapper, two backward passes) and its hooks
    mode: the same update on the same batch (q = 1, no noise), that of per-example
    gradients clipped and averaged."""
    x, y = _data(rows=32)
    torch.manual_seed(0)
    reference = Leftover()
    expected, clip = vmap_sum(reference, torch.from_numpy(x), torch.from_numpy(y))
    steps = {}
    for mode in ("hooks", "ghost"):
        model = Leftover()
        model.load_state_dict(reference.state_dict())
        before = [p.detach().clone() for p in model.parameters()]
        train_local(model, x, y, epochs=1, batch_size=32, lr=1.0, momentum=0.0, seed=1,
                    noise_multiplier=1e-9, max_grad_norm=clip, grad_sample_mode=mode)
        steps[mode] = [b - p.detach() for b, p in zip(before, model.parameters())]
    for (name, _), hooks, ghost in zip(reference.named_parameters(), steps["hooks"],
                                       steps["ghost"]):
        assert torch.allclose(hooks, ghost, atol=1e-6), name
        assert torch.allclose(hooks, expected[name] / 32, atol=1e-6), name


def test_auto_measures_once_and_draws_nothing_from_the_run():
    """A model left to Opacus: auto times hooks and ghost on a copy, once per model; the
    run then takes exactly the steps the chosen mode takes when asked for by name, with the
    same draws from the randomness and from torch's global generator (Dropout)."""
    make = lambda: nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.3), nn.PReLU(),  # noqa: E731
                                 nn.Linear(8, 2))
    train._MEASURED.clear()
    auto, auto_w = _train(make, "auto")
    assert auto.dp_path in ("hooks", "ghost") and len(train._MEASURED) == 1
    measured = dict(train._MEASURED)
    named, named_w = _train(make, auto.dp_path)
    assert torch.equal(auto_w, named_w)
    again, _ = _train(make, "auto")
    assert again.dp_path == auto.dp_path and train._MEASURED == measured  # not re-measured
    tied = Tied()
    assert train.dp_path(tied, example=torch.zeros(1, 4)) == "hooks"  # ghost refuses tying


def test_auto_takes_the_one_pass_path_where_it_can():
    make = lambda: ResidualMLP(6, 2, 8)  # noqa: E731
    auto, auto_w = _train(make, "auto")
    named, named_w = _train(make, ONE_PASS)
    assert auto.dp_path == named.dp_path == ONE_PASS and torch.equal(auto_w, named_w)
    legacy, legacy_w = _train(make, "bookkeeping")
    assert legacy.dp_path == ONE_PASS and torch.equal(auto_w, legacy_w)


def test_the_path_changes_no_draw_and_no_step():
    """Whatever the path, a step asks the randomness for the same rows and the same number
    of noise tensors of the same shapes (Opacus scales σC after the draw, the one-pass path
    before): the sampling and the noise, hence the ε, do not depend on the path."""
    calls = {}
    for mode in (ONE_PASS, "hooks", "ghost"):
        recording = _Recording(SeededRandomness(3))
        result, _ = _train(lambda: ResidualMLP(6, 2, 8), mode, randomness=recording)
        calls[mode] = ([c[:2] if c[0] == "gaussian" else c for c in recording.calls],
                       result.steps)
    assert calls[ONE_PASS] == calls["hooks"] == calls["ghost"]


def test_embedding_mlp_takes_the_steps_opacus_takes_empty_batches_included():
    """Integer codes (as float32), batches of 1 expected row (many empty): the one-pass path,
    Opacus' hooks and its ghost clipping (whose Embedding norm sampler cannot take 0 rows:
    clients.train gives it a zero gradient) end at the same weights."""
    rng = np.random.default_rng(4)
    codes = np.stack([rng.integers(0, n, 40) for n in (3, 5)], 1)
    x = np.concatenate([codes, rng.normal(size=(40, 2))], 1).astype(np.float32)
    y = rng.integers(0, 2, 40)
    weights = {}
    for mode in (ONE_PASS, "hooks", "ghost"):
        torch.manual_seed(0)
        model = CodeEmbeddingMLP([3, 5], 2, 2, 8, dropout=0.0)
        result = train_local(model, x, y, epochs=1, batch_size=1, lr=0.1, momentum=0.5,
                             seed=2, noise_multiplier=0.5, max_grad_norm=0.5,
                             grad_sample_mode=mode)
        assert result.steps == 40 and result.dp_path == mode
        weights[mode] = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.allclose(weights[ONE_PASS], weights["hooks"], atol=1e-5)
    assert torch.allclose(weights[ONE_PASS], weights["ghost"], atol=1e-5)


class DirectUse(nn.Module):
    """Weights used outside their layers' own calls: an output projection tied to the
    embedding table (h @ E.T) and a Linear's weight through F.linear."""

    def __init__(self, tied=True):
        super().__init__()
        self.tied = tied
        self.embedding = nn.Embedding(6, 4)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        h = self.embedding(x.long()).flatten(1)  # (B, 2 · 4)
        if self.tied:
            return torch.tanh(self.fc(h)) @ self.embedding.weight.T
        return nn.functional.linear(h, self.fc.weight, self.fc.bias)


@pytest.mark.parametrize("tied", [True, False])
def test_a_weight_used_outside_its_layer_is_caught_on_the_first_step(tied):
    """The static check cannot see it; the first step's check (formulas' unclipped sum vs
    autograd's batch gradient) does, and auto's probe sends such a model to Opacus' hooks."""
    model = DirectUse(tied)
    assert bookkeeping.supports(model)
    x, y = torch.randint(0, 6, (8, 2)), torch.randint(0, 4, (8,))
    with pytest.raises(bookkeeping.UsedOutsideItsLayer, match="outside its layer's own call"):
        one_pass_sum(model, x, y, 1.0)
    # Opacus' hooks mode leaves that use out of the gradient, within the clipping bound;
    # ghost clipping would add it after its norms: auto takes hooks, without measuring
    assert train.dp_path(model, example=x.float()) == "hooks"


def test_the_first_step_check_passes_where_the_formulas_see_everything():
    """Every model above passes the check (it runs on each one_pass_sum); here one whose
    first batch is empty: the check waits for a step with examples."""
    model = ResidualMLP(6, 2, 8)
    dpsgd = bookkeeping.BookkeepingDPSGD(model, _NoUpdate(), noise_multiplier=0.0,
                                         max_grad_norm=1.0, expected_batch_size=1,
                                         randomness=_NoNoise())
    dpsgd.step(torch.zeros(0, 6), torch.zeros(0, dtype=torch.int64))
    assert not dpsgd._checked
    dpsgd.step(torch.randn(5, 6), torch.randint(0, 2, (5,)))
    assert dpsgd._checked
