"""Your model: a built-in name or package.module:factory, on the DP-SGD path that fits it."""

import json
import math

import pytest
import torch
from independent import pld_epsilon
from test_inputs import simulate as run
from torch import nn

from experiments.examples import tabular
from privet.api import load_run
from privet.clients import train
from privet.common.config import CONFIGS_DIR, TrainConfig
from privet.common.data import adult
from privet.common.data.features import Features
from privet.common.data.preprocess import (CategoricalStep, FittedTransform, NumericStep, Schema,
                                           schema_features)
from privet.common.models import ModelError, build_model, check_model, unsupported

TINY = CONFIGS_DIR / "tiny.toml"
RESIDUAL = "experiments.examples.tabular:residual_mlp"
BATCHNORM = "experiments.examples.tabular:batchnorm_mlp"
EMBEDDING = "experiments.examples.tabular:embedding_mlp"


def _trains_at_exact_epsilon(out, path, used):
    code, stdout = run(out, f'train.model="{RESIDUAL}"', "rounds=1", f'train.dp-path="{path}"')
    assert code == 0, stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["accuracy"] > 0.76
    assert summary["privacy"]["dp_path"] == {"requested": path, "used": [used]}
    delta = summary["privacy"]["delta"]
    for entry in summary["privacy"]["clients"].values():
        assert entry["rounds_trained"] == 1 and entry["dp_path"] == used
        assert entry["epsilon"] == pytest.approx(pld_epsilon(entry["history"], delta), rel=0.01)
    assert "dp-path" not in str(summary["privacy"]["released_in_clear"])
    return {cid: (e["epsilon"], e["history"]) for cid, e in summary["privacy"]["clients"].items()}


def test_a_users_non_sequential_model_takes_the_one_pass_path_at_its_exact_epsilon(tmp_path):
    """The residual MLP (LayerNorm, Dropout, a residual addition) takes the one-pass path
    under train.dp-path = "auto"; the summary says so."""
    model = build_model(TrainConfig(model=RESIDUAL), (12,), 2)
    assert not isinstance(model, nn.Sequential) and train.dp_path(model) == train.ONE_PASS
    _trains_at_exact_epsilon(tmp_path, "auto", "one-pass")


@pytest.mark.slow
def test_the_dp_sgd_path_does_not_change_the_epsilon(tmp_path):
    """The same run on the one-pass path and on Opacus' hooks: the same ε and history per
    client (the path changes how clipped gradients are computed, not what is spent)."""
    assert (_trains_at_exact_epsilon(tmp_path / "auto", "auto", "one-pass")
            == _trains_at_exact_epsilon(tmp_path / "hooks", "hooks", "hooks"))


def test_a_layer_dp_sgd_cannot_train_is_one_line_naming_it_and_the_fix(tmp_path):
    code, stdout = run(tmp_path / "run", f'train.model="{BATCHNORM}"')
    assert code == 2 and "Traceback" not in stdout
    line, = [s for s in stdout.splitlines() if "error" in s]
    assert "layer '2' (BatchNorm1d)" in line and "train.fix-model = true" in line
    assert not (tmp_path / "run" / "metrics.csv").exists()


def test_fix_model_replaces_the_layer_everywhere_the_same_way_and_says_what():
    cfg = TrainConfig(model=BATCHNORM, fix_model=True)
    notes = check_model(cfg, (12,), 2)
    assert notes == ["train.fix-model replaced layer '2': BatchNorm1d → GroupNorm"]
    a, b = build_model(cfg, (12,), 2), build_model(cfg, (12,), 2)
    assert unsupported(a) == [] and a.state_dict().keys() == b.state_dict().keys()
    with pytest.raises(ModelError, match="BatchNorm1d"):
        check_model(TrainConfig(model=BATCHNORM), (12,), 2)


@pytest.mark.parametrize("name, message", [
    ("nosuch", "expected one of mlp, logreg, cnn"),
    ("no_such_package.models:net", "cannot import 'no_such_package.models'"),
    ("experiments.examples.tabular:nothing", "has no 'nothing'"),
    ("experiments.examples.tabular:math", "is not callable"),
])
def test_a_model_that_cannot_be_found_is_one_line(name, message):
    with pytest.raises(ModelError, match=message):
        build_model(TrainConfig(model=name), (3,), 2)


def test_a_factory_that_fails_or_returns_no_module_is_named(monkeypatch):
    from experiments.examples import tabular

    monkeypatch.setattr(tabular, "broken", lambda shape, outputs, cfg: 1 / 0, raising=False)
    monkeypatch.setattr(tabular, "not_a_module", lambda shape, outputs, cfg: "mlp",
                        raising=False)
    with pytest.raises(ModelError, match=r"factory failed .*ZeroDivisionError"):
        build_model(TrainConfig(model="experiments.examples.tabular:broken"), (3,), 2)
    with pytest.raises(ModelError, match="returned str, expected a torch.nn.Module"):
        build_model(TrainConfig(model="experiments.examples.tabular:not_a_module"), (3,), 2)


@pytest.mark.parametrize("name", [RESIDUAL, EMBEDDING])
def test_opacus_path_gives_the_mean_of_clipped_per_example_gradients_for_a_users_model(name):
    """No noise, one full batch: the update is lr × the mean of clipped per-example gradients
    (computed here one example at a time), as on the one-pass path. The embedding model's
    rows: two numbers and a one-hot block of three, all zero in some rows."""
    torch.manual_seed(0)
    features = _embedding_features() if name == EMBEDDING else None
    model = build_model(TrainConfig(model=name, hidden=8), (5,), 2, features)
    model.block[3].p = 0.0  # dropout off: the reference is deterministic
    x = torch.randn(16, 5)
    if features is not None:
        x[:, 2:] = torch.eye(4)[torch.arange(16) % 4][:, :3]
    y = (x[:, 0] > 0).long()
    clip, lr = 0.1, 1.0
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    per_example = []
    for i in range(len(y)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        per_example.append([p.grad.clone() for p in model.parameters()])
    norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs)) for gs in per_example])
    assert (norms > clip).any()
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    expected = [sum(f * gs[j] for f, gs in zip(factors, per_example)) / len(y)
                for j in range(len(per_example[0]))]
    model.load_state_dict(reference)
    before = [p.detach().clone() for p in model.parameters()]
    train.train_local(model, x.numpy(), y.numpy(), epochs=1, batch_size=16, lr=lr,
                      momentum=0.0, seed=0, noise_multiplier=1e-9, max_grad_norm=clip,
                      grad_sample_mode=train.dp_path(model))  # q = 1: every row, one step
    for b, p, g in zip(before, model.parameters(), expected):
        assert torch.allclose(b - p.detach(), lr * g, atol=1e-5)


def test_deployment_refuses_a_model_flower_would_not_ship(tmp_path, monkeypatch):
    from privet.common.config import PROJECT_DIR
    from privet.common.models import shipped_with_app

    (tmp_path / "elsewhere_model.py").write_text(
        "import torch\n\ndef net(shape, outputs, train):\n"
        "    return torch.nn.Linear(shape[0], outputs)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert shipped_with_app("mlp", PROJECT_DIR) is None
    assert shipped_with_app(RESIDUAL, PROJECT_DIR) is None  # in the app folder: shipped
    assert "outside the app folder" in shipped_with_app("elsewhere_model:net", PROJECT_DIR)
    assert "not found" in shipped_with_app("no_such_module_x:net", PROJECT_DIR)


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_an_embedding_model_for_adults_categoricals_trains_at_epsilon_3(tmp_path):
    """The Adult experiment (3 clients, 2 rounds) with a user's non-Sequential model that
    looks each categorical column up in an nn.Embedding: it completes at ε ≤ 3, as the
    independent accountant computes it, beats the majority class, and its tables have one
    row per vocabulary value, one for `other` and one reserved."""
    code, stdout = run(tmp_path / "run", f'train.model="{EMBEDDING}"', "privacy.epsilon=3")
    assert code == 0, stdout[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds"] == 2
    assert summary["accuracy"] > summary["scores"]["majority_baseline"]
    delta = summary["privacy"]["delta"]
    for entry in summary["privacy"]["clients"].values():
        assert entry["rounds_trained"] >= 1
        assert entry["epsilon"] == pytest.approx(pld_epsilon(entry["history"], delta), rel=0.01)
        assert entry["epsilon"] <= 3.0 * 1.001
    model = load_run(tmp_path / "run").model()  # rebuilt from transform.json: weights fit
    assert [e.num_embeddings for e in model.embeddings] == [
        len(values) + 2 for values in adult.CATEGORIES.values()]
    assert [e.embedding_dim for e in model.embeddings] == [
        tabular.embedding_dim(len(values) + 2) for values in adult.CATEGORIES.values()]
    assert train.dp_path(model) == "one-pass"  # Embedding, LayerNorm: the one-pass path


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_a_server_that_reads_no_rows_builds_the_embedding_model_from_the_clients_schema(
        tmp_path):
    """Federated evaluation with local fits: the server learns what each column is from the
    clients' description (the schema), and its model's weights fit every client's."""
    code, stdout = run(tmp_path / "run", f'train.model="{EMBEDDING}"', "rounds=1",
                       'evaluation.mode="federated"', 'preprocess.fit="local"')
    assert code == 0, stdout[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["failures"]["count"] == 0
    assert 0.5 < summary["accuracy"] <= 1.0


def test_the_feature_description_is_the_transforms_columns():
    numeric = (NumericStep("a", -math.inf, math.inf, 0.0, 0.0, 1.0),
               NumericStep("b", -math.inf, math.inf, 0.0, 0.0, 1.0))
    categorical = (CategoricalStep("c", ("x", "y"), None), CategoricalStep("d", ("u",), "u"))
    whole = FittedTransform(numeric, categorical)
    features = whole.features()
    assert features.names == tuple(whole.feature_names())
    assert features.numeric == (0, 1)
    assert [(c.name, c.start, c.stop, c.values, c.cardinality) for c in features.categorical] \
        == [("c", 2, 5, ("x", "y", "other"), 4), ("d", 5, 7, ("u", "other"), 3)]
    assert Features.from_json(features.to_json()) == features
    # selection keeps some columns: the blocks shrink, a block left empty disappears
    kept = FittedTransform(numeric, categorical, keep=(1, 3, 4)).features()
    assert kept.names == ("b", "c=y", "c=other") and kept.numeric == (0,)
    assert [(c.name, c.start, c.values) for c in kept.categorical] == [("c", 1, ("y", "other"))]
    projected = FittedTransform(numeric, categorical, pca_mean=(0.0,) * 7,
                                pca_components=((1.0,) + (0.0,) * 6,) * 2).features()
    assert projected.names == ("pc1", "pc2") and projected.categorical == ()
    # a local fit (no selection, no PCA) has the schema's columns, whatever its numbers
    schema = Schema(("a", "b"), {"c": ("x", "y"), "d": ("u",)}, "label", ("0", "1"))
    assert schema_features(schema) == features


def test_only_a_factory_that_takes_features_gets_them(monkeypatch):
    features = FittedTransform((), (CategoricalStep("c", ("x",), None),)).features()
    got = {}
    monkeypatch.setattr(tabular, "spy", lambda shape, n, cfg, **kw: got.update(kw) or
                        nn.Linear(shape[0], n), raising=False)
    build_model(TrainConfig(model="experiments.examples.tabular:spy"), (2,), 2, features)
    assert got == {"features": features}
    assert isinstance(build_model(TrainConfig(model=RESIDUAL), (2,), 2, features),
                      tabular.ResidualMLP)  # no such keyword: called as before
    with pytest.raises(ModelError, match="description has 2 columns"):
        build_model(TrainConfig(model=EMBEDDING), (3,), 2, features)
    plain = build_model(TrainConfig(model=EMBEDDING), (3,), 2)  # no description: numbers
    assert len(plain.embeddings) == 0 and plain.numbers.in_features == 3


def test_a_one_hot_block_becomes_its_index_and_an_empty_block_the_reserved_one():
    block = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0, 0, 1.0]])
    assert tabular.category_index(block).tolist() == [1, 0, 3, 2]


def _embedding_features():
    return FittedTransform((NumericStep("a", 0, 1, 0, 0, 1), NumericStep("b", 0, 1, 0, 0, 1)),
                           (CategoricalStep("c", ("x", "y"), None),)).features()


def test_one_pass_by_name_refuses_a_model_it_cannot_train_before_round_1(tmp_path, monkeypatch):
    from privet.common.config import load_config
    from privet.experiments.simulation import preflight

    (tmp_path / "prelu_model.py").write_text(
        "import torch\n\ndef net(shape, outputs, train):\n"
        "    return torch.nn.Sequential(torch.nn.Linear(shape[0], 8), torch.nn.PReLU(),\n"
        "                               torch.nn.Linear(8, outputs))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(TINY, ['train.model="prelu_model:net"', 'train.dp-path="one-pass"'])
    with pytest.raises(ModelError, match=r"one-pass.*layer '1' \(PReLU\): no one-pass formula"):
        preflight(cfg)
    preflight(load_config(TINY, ['train.model="prelu_model:net"']))  # auto: Opacus takes it


USER_MODELS = '''
import torch
from torch import nn


class Additive(nn.Module):
    """A neural additive model that runs every feature through one small net by folding
    the features into the batch: (B, F) -> (B*F, 1) -> (B, F) -> (B, outputs)."""

    def __init__(self, features, outputs):
        super().__init__()
        self.each = nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1))
        self.head = nn.Linear(features, outputs)

    def forward(self, x):
        b, f = x.shape
        return self.head(self.each(x.reshape(b * f, 1)).reshape(b, f))


class Centering(nn.Module):
    def __init__(self, features, outputs):
        super().__init__()
        self.linear = nn.Linear(features, outputs)

    def forward(self, x):
        h = self.linear(x)
        return h - h.mean(0)


class Remembering(nn.Module):
    """Keeps the mean of what it saw in a buffer: a statistic of the data, not a parameter."""

    def __init__(self, features, outputs):
        super().__init__()
        self.linear = nn.Linear(features, outputs)
        self.register_buffer("seen", torch.zeros(features))

    def forward(self, x):
        if self.training and len(x):
            self.seen = x.mean(0).detach()
        return self.linear(x)


def additive(shape, outputs, train):
    return Additive(shape[0], outputs)


def centering(shape, outputs, train):
    return Centering(shape[0], outputs)


def remembering(shape, outputs, train):
    return Remembering(shape[0], outputs)


def one_output(shape, outputs, train):
    return nn.Linear(shape[0], 1)


def wrong_input(shape, outputs, train):
    return nn.Linear(shape[0] + 1, outputs)
'''


@pytest.fixture
def user_models(tmp_path, monkeypatch):
    (tmp_path / "user_models.py").write_text(USER_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import user_models
    return importlib.reload(user_models)


@pytest.mark.parametrize("name, message", [
    ("one_output", r"gave output \(3, 1\); expected \(3, 2\)"),
    ("wrong_input", "a forward pass on a batch of shape"),
    ("centering", "mixes examples"),
    ("Additive", "names the class Additive; expected a factory function")])
def test_a_model_is_tried_on_made_up_examples_before_round_1(user_models, name, message):
    with pytest.raises(ModelError, match=message):
        check_model(TrainConfig(model=f"user_models:{name}"), (5,), 2)
    check_model(TrainConfig(model="user_models:additive"), (5,), 2)  # per example: fine


@pytest.mark.parametrize("mode", ["one-pass", "hooks", "ghost"])
def test_a_model_that_folds_the_batch_is_refused_on_every_dp_sgd_path(user_models, mode):
    """(B, F) -> (B·F, 1) inside forward: clipping would bound each row, not each example, so
    an example could move the sum by F·C; every path stops instead of training."""
    torch.manual_seed(0)
    model = user_models.additive((5,), 2, None)
    x, y = torch.randn(40, 5).numpy(), torch.randint(0, 2, (40,)).numpy()
    # Opacus' ghost clipping fails inside its own backward pass, before privet's check
    with pytest.raises(RuntimeError if mode == "ghost" else ValueError,
                       match="stack expects" if mode == "ghost" else "batch"):
        train.train_local(model, x, y, epochs=1, batch_size=8, lr=0.1, momentum=0.0, seed=0,
                          noise_multiplier=1.0, max_grad_norm=1.0, grad_sample_mode=mode)


def test_a_buffer_training_writes_is_never_sent_and_a_failed_clients_spend_is_reported(
        user_models, tmp_path, monkeypatch):
    """A buffer holding a mean of the rows would reach the server outside every ε: the client
    fails instead of replying, and the summary still reports what the failed round cost (it
    was paid before it ran), as the ledger on disk records it."""
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the CLI runs in a child process
    ledger = tmp_path / "ledger"
    code, stdout = run(tmp_path / "run", 'train.model="user_models:remembering"', "rounds=1",
                       f'privacy.ledger-dir="{ledger}"')
    assert code != 0, stdout[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    reasons = [c["reason"] for c in summary["failures"]["clients"].values()]
    assert reasons and all("buffer(s) seen" in r for r in reasons)
    saved = tmp_path / "run" / "model.pt"  # the global model: no client's update arrived
    assert not saved.exists() or not torch.load(saved)["state_dict"]["seen"].any()
    for entry in summary["privacy"]["clients"].values():
        assert "dp-sgd" in entry["purposes"]
        assert entry["epsilon"] == pytest.approx(pld_epsilon(entry["history"],
                                                             summary["privacy"]["delta"]),
                                                 rel=0.01)
