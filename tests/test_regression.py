"""`train.task = "regression"`: end to end through the CLI, DP-SGD's per-example gradients of
the regression losses and the ε of a regression run against independent computations, and
every refused combination in one line."""

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import PROJECT_DIR
from independent import pld_epsilon
from test_simulation import privet, rows

from privet.clients import metrics as metrics_dp
from privet.clients.bookkeeping import BookkeepingDPSGD
from privet.clients.train import BOOKKEEPING, sample_rate, steps_per_epoch, train_local
from privet.common.config import CONFIGS_DIR, ConfigError, TrainConfig, from_mapping, load_config
from privet.common.data import datasets
from privet.common.data.target import TargetScale, partition_bins, target_scale
from privet.common.losses import task_loss
from privet.common.models import build_model
from privet.common.privacy.randomness import SeededRandomness

TINY = CONFIGS_DIR / "tiny.toml"
ROWS, FEATURES = 256, 12


# --- end to end on an easy synthetic CSV ----------------------------------------------------

def _synthetic(path, rows=3000, seed=0):
    """y = 50 + 20·x1 − 10·x2 + 5·[colour = b] + N(0, 2²): most of its variance is explained
    by the features (R² ≈ 0.97 for the best model)."""
    rng = np.random.default_rng(seed)
    x1, x2 = rng.uniform(-1, 1, rows), rng.uniform(-1, 1, rows)
    colour = rng.choice(["a", "b", "c"], rows)
    y = 50 + 20 * x1 - 10 * x2 + 5 * (colour == "b") + rng.normal(0, 2, rows)
    pd.DataFrame({"x1": x1.round(4), "x2": x2.round(4), "colour": colour,
                  "target": y.round(3)}).to_csv(path, index=False)


SETTINGS = ["data.dataset=\"csv\"", "data.label=\"target\"", "data.label-bounds=[0, 100]",
            "data.bounds={ x1 = [-1, 1], x2 = [-1, 1] }",
            "data.categories={ colour = [\"a\", \"b\", \"c\"] }", "train.task=\"regression\"",
            "data.partition=\"dirichlet\"", "data.alpha=1.0", "data.min-rows=200",
            "rounds=3", "privacy.epsilon=4.0", "privacy.train-metrics=\"noised\"",
            "train.batch-size=64", "name=\"regression\""]


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("regression")
    data = folder / "synthetic.csv"
    _synthetic(data)
    out = folder / "run"
    args = ["simulate", "--config", str(TINY), "--out", str(out),
            "--set", f"data.path={json.dumps(str(data))}"]
    for setting in SETTINGS:
        args += ["--set", setting]
    proc = privet(*args)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:]
    cfg = load_config(TINY, [f"data.path={json.dumps(str(data))}", *SETTINGS])
    return out, stdout, cfg


def test_a_regression_run_reports_rmse_mae_r2_and_beats_the_baseline(regression_run):
    out, stdout, cfg = regression_run
    table = rows(out / "rounds.csv")
    assert set(table[0]) >= {"test_rmse", "test_mae", "test_r2", "baseline_rmse",
                             "baseline_mae", "max_epsilon"}
    assert not any("accuracy" in column for column in table[0])  # left out, not faked
    last = table[-1]
    assert float(last["test_r2"]) > 0.5  # the baseline's R² is 0 by definition
    assert float(last["test_rmse"]) < float(last["baseline_rmse"])
    assert float(last["test_mae"]) < float(last["baseline_mae"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "regression" and "accuracy" not in summary
    assert summary["scores"]["test_r2"] == pytest.approx(float(last["test_r2"]))
    assert summary["target"]["label"] == "target" and summary["target"]["half"] == 50.0
    clients = rows(out / "metrics.csv")
    assert "accuracy" not in clients[0] and all(r["loss"] for r in clients)
    assert "test scores of target" in stdout and "baseline (test mean)" in stdout
    assert (out / "accuracy_epsilon.png").stat().st_size > 0


def test_the_scores_are_those_of_the_saved_model_in_the_labels_units(regression_run):
    """RMSE, MAE, R² and the baseline recomputed here from model.pt and the raw test labels
    (numpy, not privet's scoring); the label column is not among the features."""
    out, _, cfg = regression_run
    test = datasets.test_data(cfg, (out / "transform.json").read_text())
    assert not any(name.startswith("target") for name in test.feature_names)
    model = build_model(cfg.train, test.features.shape[1:], 1)
    model.load_state_dict(torch.load(out / "model.pt")["state_dict"])
    with torch.no_grad():
        z = model(torch.from_numpy(test.features)).numpy()[:, 0].astype(np.float64)
    _, raw = datasets.test_rows(cfg)  # the test labels as read, in their units
    predicted = 50.0 + 50.0 * z
    error = predicted - raw
    last = rows(out / "rounds.csv")[-1]
    assert float(last["test_rmse"]) == pytest.approx(np.sqrt(np.mean(error ** 2)), rel=1e-4)
    assert float(last["test_mae"]) == pytest.approx(np.mean(np.abs(error)), rel=1e-4)
    r2 = 1 - np.sum(error ** 2) / np.sum((raw - raw.mean()) ** 2)
    assert float(last["test_r2"]) == pytest.approx(r2, abs=1e-4)
    assert float(last["baseline_rmse"]) == pytest.approx(raw.std(), rel=1e-4)


def test_epsilon_of_a_regression_run_is_dp_accountings_for_its_steps(regression_run):
    """Each client's reported ε equals dp-accounting's PLD for the (σ, q, steps) it recorded,
    and those are what DP-SGD at q = 1/⌈n/B⌉ for rounds·⌈n/B⌉ steps, the statistics and the
    noised training metrics (a loss alone for regression: the same Gaussian σ) should be."""
    out, _, cfg = regression_run
    summary = json.loads((out / "summary.json").read_text())
    delta = summary["privacy"]["delta"]
    for cid, entry in summary["privacy"]["clients"].items():
        n = len(datasets.cleaned_client(cfg, int(cid))[1])
        history = dict(zip(entry["purposes"], entry["history"]))
        sgd = [h for h, p in zip(entry["history"], entry["purposes"]) if p == "dp-sgd"]
        assert len(sgd) == cfg.rounds
        for sigma, q, steps in sgd:
            assert q == pytest.approx(sample_rate(n, cfg.train.batch_size))
            assert steps == steps_per_epoch(n, cfg.train.batch_size)
        assert history["statistics"][1:] == [1.0, 1]
        metrics = [h for h, p in zip(entry["history"], entry["purposes"])
                   if p == "train-metrics"]
        assert len(metrics) == cfg.rounds and all(h[1:] == [1.0, 1] for h in metrics)
        assert pld_epsilon(metrics, delta) <= cfg.privacy.train_metrics_epsilon * 1.001
        assert entry["epsilon"] == pytest.approx(pld_epsilon(entry["history"], delta),
                                                 rel=0.01)
        assert entry["epsilon"] <= cfg.privacy.epsilon * 1.001


def test_a_regression_run_is_not_audited_and_says_why(regression_run):
    from privet.common.audit import audit_run

    out, _, _ = regression_run
    with pytest.raises(ValueError, match=r"^train.task = \"regression\": not audited"):
        audit_run(out)


def test_the_report_shows_regression_scores_and_refuses_mixed_tasks(regression_run, tmp_path):
    from privet.experiments import report

    out, _, _ = regression_run
    built = report.build([out], tmp_path / "report")
    assert {"RMSE", "R²", "baseline RMSE"} <= set(built.header) and "accuracy" not in built.header
    header = (tmp_path / "report" / report.CSV).read_text().splitlines()[0].split(",")
    assert {"rmse", "mae", "r2", "baseline_rmse"} <= set(header) and "accuracy" not in header
    html = (tmp_path / "report" / report.HTML).read_text()
    assert "Test RMSE vs target ε" in html and "Not audited" in html
    with pytest.raises(ValueError, match="mix train.task"):
        report.is_regression([{"task": "regression"}, {"task": "classification"}])


# --- DP-SGD on a regression loss ------------------------------------------------------------

def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(ROWS, FEATURES)).astype(np.float32) * 3
    y = np.clip(0.3 * x[:, 0] + 0.1 * rng.normal(size=ROWS), -1, 1).astype(np.float32)
    return x, y


def _model(name):
    torch.manual_seed(0)
    return build_model(TrainConfig(model=name, hidden=8), (FEATURES,), 1)


def _per_example_gradients(model, x, y, loss):
    """Each example's gradient of its own loss by torch.func (vmap over grad), with the loss
    written out here, not taken from privet."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(p, xi, yi):
        prediction = torch.func.functional_call(model, p, (xi.unsqueeze(0),))[0, 0]
        error = prediction - yi
        if loss == "mse":
            return error ** 2
        return torch.where(error.abs() <= 1.0, 0.5 * error ** 2, error.abs() - 0.5)

    return torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(
        params, torch.from_numpy(x), torch.from_numpy(y))


class _Capture:
    """An optimizer that keeps the gradient it was asked to apply."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def step(self):
        self.grads = [p.grad.detach().clone() for p in self.params]


@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("name", ["mlp", "logreg"])
def test_one_pass_per_example_gradients_of_a_regression_loss_are_torch_funcs(name, loss):
    """The one-pass step's gradient, noise-free, is Σ_i min(1, C/(‖g_i‖ + 1e-6)) g_i / B with
    g_i each example's gradient from torch.func: its per-example norms and gradients are
    exact (some rows clipped, some not)."""
    x, y = _data()
    model = _model(name)
    grads = _per_example_gradients(model, x, y, loss)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    clip = float(norms.median())
    assert (norms > clip).any() and (norms < clip).any()
    factor = torch.clamp(clip / (norms + 1e-6), max=1.0)
    expected = {k: (g * factor.view(-1, *[1] * (g.dim() - 1))).sum(0) / ROWS
                for k, g in grads.items()}
    capture = _Capture(model.parameters())
    dpsgd = BookkeepingDPSGD(model, capture, noise_multiplier=0.0, max_grad_norm=clip,
                             expected_batch_size=ROWS, randomness=SeededRandomness(0),
                             loss=loss)
    out, loss_sum = dpsgd.step(torch.from_numpy(x), torch.from_numpy(y))
    assert out.shape == (ROWS, 1)
    assert float(loss_sum) == pytest.approx(
        float(task_loss(loss, out, torch.from_numpy(y), reduction="sum")), rel=1e-6)
    for (key, _), got in zip(model.named_parameters(), capture.grads):
        assert torch.allclose(got, expected[key], atol=1e-6), key


@pytest.mark.parametrize("loss", ["mse", "huber"])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_both_dp_sgd_paths_take_the_same_regression_steps(mode, loss):
    """Same seed: privet's one-pass path and Opacus' take the same Poisson batches,
    clipping and noise on a regression loss, so they end with the same model."""
    x, y = _data()
    trained = {}
    for path in (BOOKKEEPING, mode):
        model = _model("mlp")
        result = train_local(model, x, y, epochs=2, batch_size=8, lr=0.1, momentum=0.5,
                             seed=7, noise_multiplier=0.8, max_grad_norm=0.3,
                             grad_sample_mode=path, loss=loss)
        trained[path] = (result, [p.detach() for p in model.parameters()])
    (ours, ours_params), (opacus, opacus_params) = trained[BOOKKEEPING], trained[mode]
    assert ours.steps == opacus.steps == 2 * 32
    assert math.isnan(ours.accuracy) and ours.loss == pytest.approx(opacus.loss, rel=1e-5)
    for a, b in zip(ours_params, opacus_params):
        assert torch.allclose(a, b, atol=1e-5)


def test_noised_regression_metrics_move_by_at_most_one_per_row():
    """The clipped loss sum (in units of its bound) changes by at most 1 when a row is
    added, however far off the prediction: the sensitivity the noise is sized for."""
    x, y = _data()
    model = _model("mlp")
    with torch.no_grad():
        model[-1].bias.fill_(100.0)  # every prediction far outside [-1, 1]: losses clipped
    before, = metrics_dp.clipped_sums(model, x[:-1], y[:-1], loss="mse")
    after, = metrics_dp.clipped_sums(model, x, y, loss="mse")
    assert after - before == pytest.approx(1.0)
    assert metrics_dp.sensitivity("mse") == 1.0 and metrics_dp.sensitivity() == math.sqrt(2)
    loss, accuracy = metrics_dp.release(model, x, y, 0.5, SeededRandomness(0), "huber")
    assert accuracy is None and 0.0 <= loss <= metrics_dp.LOSS_BOUND


# --- data -----------------------------------------------------------------------------------

def _adult_age(*more):
    return load_config(TINY, ["train.task=\"regression\"", "data.label=\"age\"", *more])


def test_adult_age_is_a_label_not_a_feature_clipped_on_clients_only():
    cfg = _adult_age("data.partition=\"iid\"")
    scale = target_scale(cfg)
    assert scale == TargetScale(16.0, 100.0)
    client = datasets.client_data(cfg, 0)
    assert "age" not in client.feature_names and "income=>50K" in client.feature_names
    assert client.labels.dtype == np.float32
    assert client.labels.min() >= -1.0 and client.labels.max() <= 1.0
    _, raw = datasets.test_rows(cfg)
    test = datasets.test_data(cfg)
    assert np.allclose(scale.decode(test.labels), raw, atol=1e-4)  # not clipped
    assert test.features[:, test.feature_names.index("income=other")].sum() == 0  # ">50K."


def test_label_skew_partitions_split_quantile_bins_of_a_regression_label():
    values = np.random.default_rng(0).normal(40, 10, 1000)
    bins = partition_bins(values)
    assert set(bins) == set(range(10)) and np.bincount(bins).min() >= 90
    assert (np.diff(bins[np.argsort(values)]) >= 0).all()  # ordered by the label
    assert set(partition_bins(np.repeat([1.0, 2.0], 50))) == {0, 1}  # tied edges merge
    cfg = _adult_age("data.partition=\"dirichlet\"", "data.alpha=0.1")
    parts = datasets.partitions(cfg)
    assert sorted(np.concatenate(parts).tolist()) == list(range(32561))  # every row once
    report = datasets.partition_report(cfg)
    assert {"label-mean", "label-std"} <= set(report[0])
    means = [r["label-mean"] for r in report]
    assert max(means) - min(means) > 5  # α = 0.1: clients of different ages


def test_a_label_that_is_not_numbers_is_refused_naming_it(tmp_path):
    from privet.common.data.tables import DataError

    data = tmp_path / "words.csv"
    pd.DataFrame({"x": range(100), "y": ["low", "high"] * 50}).to_csv(data, index=False)
    cfg = load_config(TINY, ["data.dataset=\"csv\"", f"data.path={json.dumps(str(data))}",
                             "data.label=\"y\"", "data.label-bounds=[0, 1]",
                             "train.task=\"regression\""])
    with pytest.raises(DataError, match="label column 'y': 0% of its values are numbers"):
        datasets.schema(cfg)


# --- refusals -------------------------------------------------------------------------------

REFUSED = [
    ({"train": {"loss": "huber"}}, "train.loss = \"huber\" with train.task = "
                                   "\"classification\""),
    ({"train": {"loss": "mse"}}, "train.loss = \"mse\""),
    ({"data": {"label-bounds": [0, 1]}}, "data.label-bounds: only for train.task"),
    ({"data": {"label": "age"}}, "data.label = 'age' with data.dataset = \"adult\""),
    ({"train": {"task": "regression", "loss": "cross-entropy"}, "data": {"label": "age"}},
     "train.loss = \"cross-entropy\" with train.task = \"regression\""),
    ({"train": {"task": "regression"}}, "data.label = '': train.task = \"regression\" on adult"),
    ({"train": {"task": "regression"}, "data": {"label": "workclass"}},
     "data.label = 'workclass'"),
    ({"train": {"task": "regression"}, "data": {"dataset": "digits"}},
     "train.task = \"regression\" with data.dataset = \"digits\""),
    ({"train": {"task": "regression"}, "data": {"label": "age", "classes": ["a", "b"]}},
     "data.classes: a list of classes"),
    ({"train": {"task": "regression"}, "data": {"dataset": "csv", "path": "x.csv",
                                                 "label": "y"}},
     "data.label-bounds: required for train.task = \"regression\" on csv"),
    ({"train": {"task": "regression"}, "data": {"label": "age", "label-bounds": [5, 1]}},
     "data.label-bounds = [5, 1]: expected [low, high]"),
    ({"train": {"task": "regression"}, "data": {"label": "age"},
      "evaluation": {"mode": "federated"}},
     "evaluation.mode = \"federated\" with train.task = \"regression\""),
    ({"train": {"task": "regression"}, "data": {"label": "age"},
      "preprocess": {"select": "mutual-info"}},
     "preprocess.select = \"mutual-info\" with train.task = \"regression\""),
]


@pytest.mark.parametrize("values, message", REFUSED)
def test_each_combination_that_does_not_fit_the_task_is_one_line_naming_its_key(values,
                                                                                message):
    with pytest.raises(ConfigError) as refused:
        from_mapping(values)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)


def test_data_bounds_on_the_label_point_to_label_bounds():
    cfg = _adult_age("data.bounds={ age = [0, 120] }")
    with pytest.raises(ValueError, match="'age' is the label .*data.label-bounds"):
        datasets.schema(cfg)


def test_the_cli_refuses_a_bad_combination_in_one_line_before_starting(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "privet.experiments.cli", "simulate", "--config", str(TINY),
         "--set", "train.loss=\"huber\"", "--out", str(tmp_path / "run")],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--set train.loss=\"huber\"" in lines[0]
    assert "train.loss = \"huber\" with train.task = \"classification\"" in lines[0]
    assert not (tmp_path / "run").exists()


def test_the_shipped_regression_demo_loads():
    cfg = load_config(CONFIGS_DIR / "adult-regression.toml")
    assert cfg.regression and cfg.loss_name == "mse" and cfg.data.label == "age"
    assert target_scale(cfg) == TargetScale(16.0, 100.0)
    assert datasets.model_input_shape(cfg) == (datasets.encoded_width(datasets.schema(cfg)),)
    assert datasets.num_outputs(cfg) == 1  # the model has one output: the scaled age


def test_a_deployed_node_reads_a_regression_file_with_only_categories_declared(tmp_path):
    """A node's own file: features cannot depend on its rows, so the categories must be
    declared; a regression label has no classes to declare."""
    data = tmp_path / "node.csv"
    _synthetic(data, rows=300)
    cfg = load_config(TINY, [f"data.path={json.dumps(str(data))}", *SETTINGS])
    node = datasets.node_source(cfg.data, str(data), datasets.missing_markers(cfg),
                                cfg.train.task)
    assert node.schema.regression and node.schema.classes == () and len(node.train) == 300
    undeclared = load_config(TINY, [f"data.path={json.dumps(str(data))}", *SETTINGS,
                                    "data.categories={}"])
    with pytest.raises(ValueError, match="declare data.categories for \\['colour'\\]"):
        datasets.node_source(undeclared.data, str(data), datasets.missing_markers(cfg),
                             cfg.train.task)
