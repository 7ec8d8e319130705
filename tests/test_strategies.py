"""[strategy] name: Flower's strategies under privet's wrapper; post-processing of
sample-level DP updates, so ε does not move."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower
from test_spend_report import simulate
from test_strategy import ConnectedNodes
from test_user_dp import task_identity  # noqa: F401 (a fixture)

from privet.common.config import CONFIGS_DIR, ConfigError, load_config
from privet.server import strategies

NODES = [11, 12, 13, 14, 15, 16]
UPDATES = {11: 1.0, 12: 2.0, 13: 4.0, 14: -3.0, 15: 100.0, 16: 0.5}  # 15: an outlier
EXAMPLES = {11: 10, 12: 30, 13: 20, 14: 10, 15: 10, 16: 20}


def _round(strategy, declined=()):
    """configure_train on six nodes, a reply from each (global + its update; `declined`
    nodes decline), aggregate_train: the strategy's real path."""
    start = torch.zeros(3)
    sent = list(strategy.configure_train(1, ArrayRecord({"w": start}), ConfigRecord({}),
                                         ConnectedNodes(NODES)))
    replies = [Message(RecordDict({
        "arrays": ArrayRecord({"w": start + UPDATES[m.metadata.dst_node_id]}),
        "metrics": MetricRecord({"client-id": m.metadata.dst_node_id,
                                 "num-examples": EXAMPLES[m.metadata.dst_node_id],
                                 "declined": int(m.metadata.dst_node_id in declined)})}),
        reply_to=m) for m in sent]
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays.to_torch_state_dict()["w"].numpy()


def _strategy(name, **settings):
    overrides = [f'strategy.name="{name}"', "num-clients=6", "clients-per-round=6"] + [
        f"strategy.{k}={v}" for k, v in settings.items()]
    cfg = load_config(CONFIGS_DIR / "tiny.toml", overrides)
    return strategies.strategy_class(name)(fraction_train=1.0, clients_per_round=6, seed=0,
                                           fraction_evaluate=0.0,
                                           **strategies.options(cfg))


def test_robust_aggregates_are_their_textbook_definitions(task_identity):
    kept = [n for n in NODES if n != 12]  # 12 declines: left out of every aggregate
    values = np.array([UPDATES[n] for n in kept])
    weights = np.array([EXAMPLES[n] for n in kept], dtype=float)
    assert _round(_strategy("fedavg", weighting='"examples"'), [12]) == pytest.approx(
        np.full(3, (values * weights).sum() / weights.sum()))
    assert _round(_strategy("fedavg", weighting='"uniform"'), [12]) == pytest.approx(
        np.full(3, values.mean()))
    assert _round(_strategy("median"), [12]) == pytest.approx(np.full(3, np.median(values)))
    cut = int(0.2 * len(values))  # trimmed at each end, per coordinate
    assert _round(_strategy("trimmed-mean", **{"trim-beta": 0.2}), [12]) == pytest.approx(
        np.full(3, np.sort(values)[cut:len(values) - cut].mean()))
    # Krum keeps the update whose nearest n - f - 2 others are closest: never the outlier
    krum = _round(_strategy("krum", byzantine=1), [12])
    assert krum[0] in values and krum[0] != 100.0


@pytest.mark.parametrize("name, flower_class", [
    ("fedavgm", flower.FedAvgM), ("fedadam", flower.FedAdam), ("fedyogi", flower.FedYogi),
    ("fedadagrad", flower.FedAdagrad)])
def test_server_optimizers_step_as_flowers_own_on_the_clients_that_trained(
        task_identity, name, flower_class):
    """The maths is Flower's (Reddi et al. 2021; Hsu et al. 2019): privet's wrapper gives the
    same step as Flower's class fed only the replies of clients that trained."""
    ours = _round(_strategy(name, weighting='"examples"'), [12, 13])  # as Flower weighs
    theirs_strategy = flower_class(fraction_train=1.0, fraction_evaluate=0.0,
                                   **strategies.flower_options(load_config(
                                       CONFIGS_DIR / "tiny.toml", [f'strategy.name="{name}"'])))
    start = torch.zeros(3)
    sent = list(theirs_strategy.configure_train(1, ArrayRecord({"w": start}), ConfigRecord({}),
                                                ConnectedNodes(NODES)))
    replies = [Message(RecordDict({
        "arrays": ArrayRecord({"w": start + UPDATES[m.metadata.dst_node_id]}),
        "metrics": MetricRecord({"num-examples": EXAMPLES[m.metadata.dst_node_id]})}),
        reply_to=m) for m in sent if m.metadata.dst_node_id not in (12, 13)]
    arrays, _ = theirs_strategy.aggregate_train(1, replies)
    assert ours == pytest.approx(arrays.to_torch_state_dict()["w"].numpy(), rel=1e-6)
    assert not np.allclose(ours, 0.0)


def test_a_server_optimizer_spends_no_epsilon(tmp_path):
    """Post-processing: the same seed under fedavg and fedadam gives every client the same
    spend history (σ, q, steps), so the same ε."""
    plain, _ = simulate(tmp_path / "fedavg", "rounds=1")
    adam, _ = simulate(tmp_path / "fedadam", 'strategy.name="fedadam"', "rounds=1")
    assert adam["status"] == "complete"
    for cid, entry in plain["privacy"]["clients"].items():
        assert adam["privacy"]["clients"][cid]["history"] == entry["history"]
        assert adam["privacy"]["clients"][cid]["epsilon"] == entry["epsilon"]
    assert 'name = "fedadam"' in (tmp_path / "fedadam" / "config.toml").read_text()


def test_combinations_that_would_break_user_level_dp_are_refused():
    for name in ("fedadam", "median", "krum"):
        with pytest.raises(ConfigError, match="refused: user-level DP clips"):
            load_config(CONFIGS_DIR / "tiny.toml", [f'strategy.name="{name}"',
                                                    "privacy.level=user"])
