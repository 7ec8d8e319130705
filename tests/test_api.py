"""`import privet`: run an experiment and read it back from Python."""

import pytest
import torch
from flwr.serverapp.strategy import FedMedian

import privet
from privet.common.config import CONFIGS_DIR
from privet.common.data import datasets
from privet.common.evaluation import evaluate
from experiments.examples import tabular

TINY = CONFIGS_DIR / "tiny.toml"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny round with a user's factory and a strategy class, passed as themselves."""
    out = tmp_path_factory.mktemp("api") / "run"
    return privet.simulate(TINY, {"rounds": 1, "privacy.epsilon": 3.0},
                           model=tabular.residual_mlp, strategy=FedMedian, out=out)


def test_simulate_returns_a_run_whose_model_scores_what_the_run_reported(run):
    assert run.summary["status"] == "complete" and run.config.privacy.epsilon == 3.0
    assert list(run.rounds["round"]) == [1]
    assert set(run.clients["status"]) == {"trained"} and len(run.clients) == 3
    model = run.model()
    test = datasets.test_data(run.config, (run.path / "transform.json").read_text())
    _, accuracy = evaluate(model, test.features, test.labels)
    assert accuracy == pytest.approx(run.rounds["test_accuracy"].iloc[-1], abs=1e-6)
    assert privet.load_run(run.path).summary == run.summary


def test_a_users_factory_is_passed_as_itself_and_rebuilt_by_the_run(run):
    assert run.config.train.model == "experiments.examples.tabular:residual_mlp"
    assert run.config.strategy.name == "flwr.serverapp.strategy.fedmedian:FedMedian"
    assert isinstance(run.model(), tabular.ResidualMLP)
    with pytest.raises(privet.PrivetError, match="importable module"):
        privet.simulate(TINY, model=lambda shape, outputs, cfg: torch.nn.Linear(1, 1))


def test_bad_input_raises_privets_one_line_and_reading_a_non_run_says_so(tmp_path):
    with pytest.raises(privet.PrivetError, match="privacy.epsilon") as error:
        privet.simulate(TINY, {"privacy.epsilon": -1}, out=tmp_path / "run")
    assert error.value.code == 2 and "Traceback" not in error.value.output
    with pytest.raises(FileNotFoundError, match="not a privet run directory"):
        privet.load_run(tmp_path)


def test_compare_returns_one_row_per_budget_and_seed(tmp_path):
    table = privet.compare(TINY, epsilons=("inf",), seeds=1, overrides={"rounds": 1},
                           out=tmp_path / "cmp")
    assert len(table) == 1 and "accuracy" in table.columns


def test_overrides_take_numpy_scalars_and_client_ids_and_refuse_none():
    import numpy as np

    from privet.api import _settings
    from privet.common.config import load_config

    settings = _settings({"privacy.epsilon": np.float64(1.5), "rounds": np.int64(2),
                          "privacy.client-epsilon": {0: 1.0}})
    cfg = load_config(TINY, settings)
    assert cfg.privacy.epsilon == 1.5 and cfg.rounds == 2 and cfg.epsilon_for(0) == 1.0
    with pytest.raises(privet.PrivetError, match="rounds = None"):
        _settings({"rounds": None})
