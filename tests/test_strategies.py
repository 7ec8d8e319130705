"""[strategy] name: Flower's strategies under privet's wrapper; post-processing of
sample-level DP updates, so ε does not move."""

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flower
from test_spend_report import simulate
from test_strategy import ConnectedNodes
from test_inputs import one_error_line
from test_inputs import simulate as simulate_any
from test_user_dp import NoNoise, task_identity  # noqa: F401 (a fixture)
from torch import nn

from privet.clients.train import train_local
from privet.common.config import CONFIGS_DIR, ConfigError, load_config
from privet.server import strategies
from privet.server.strategies.after_noise import step_on_aggregate
from privet.server.user_dp import UserLevelDPFedAvg

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


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
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
    for name in ("trimmed-mean", "median", "krum", "tests.somewhere:Mine"):
        with pytest.raises(ConfigError, match="refused: user-level DP clips"):
            load_config(CONFIGS_DIR / "tiny.toml", [f'strategy.name="{name}"',
                                                    "privacy.level=user"])
    for name in ("fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        load_config(CONFIGS_DIR / "tiny.toml", [f'strategy.name="{name}"', "privacy.level=user"])


class KnownNoise(NoNoise):
    """Every row in every step (and every node sampled); each Gaussian draw is std · 0.7."""

    def gaussian(self, shape, std, dtype=torch.float32):
        return torch.full(tuple(shape), 0.7 * std, dtype=dtype)


@pytest.mark.parametrize("mode", ["bookkeeping", "hooks"])
def test_fedprox_adds_its_term_after_clipping_and_noise(mode):
    """A replay by hand: per-example gradients, each clipped to C, summed, noised, divided by
    the batch, then μ(w − w_start) added, then the SGD step. With C tiny and μ large, the
    term inside the clipped loss would be clipped away; here it is whole."""
    torch.manual_seed(0)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    model = nn.Sequential(nn.Linear(3, 2))
    start = [p.detach().clone() for p in model.parameters()]
    replay = [p.detach().clone().requires_grad_() for p in model.parameters()]
    sigma, clip, lr, mu, batch = 1.3, 0.05, 0.1, 4.0, 4
    train_local(model, x.numpy(), y.numpy(), epochs=1, batch_size=batch, lr=lr, momentum=0.0,
                seed=0, noise_multiplier=sigma, max_grad_norm=clip, grad_sample_mode=mode,
                randomness=KnownNoise(), proximal_mu=mu)
    steps, expected = 12 // batch, 12 // (12 // batch)  # every row, ⌈n/B⌉ steps a epoch
    for _ in range(steps):
        total = [torch.zeros_like(w) for w in replay]
        for i in range(12):
            loss = nn.functional.cross_entropy(x[i:i + 1] @ replay[0].T + replay[1], y[i:i + 1])
            grads = torch.autograd.grad(loss, replay)
            norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
            factor = min(1.0, clip / (float(norm) + 1e-6))
            total = [t + g * factor for t, g in zip(total, grads)]
        with torch.no_grad():
            for w, t, w0 in zip(replay, total, start):
                gradient = (t + 0.7 * sigma * clip) / expected + mu * (w - w0)
                w -= lr * gradient
    for trained, replayed in zip(model.parameters(), replay):
        assert torch.allclose(trained, replayed, atol=1e-5)
    assert not torch.allclose(list(model.parameters())[0], start[0], atol=1e-3)


def test_fedprox_reaches_the_clients_and_spends_no_epsilon(tmp_path):
    """The proximal weight travels in Flower's "proximal-mu" config key: a large μ changes
    the model and nothing of the spend."""
    plain, _ = simulate(tmp_path / "fedavg", "rounds=2")
    prox, _ = simulate(tmp_path / "fedprox", 'strategy.name="fedprox"',
                       "strategy.proximal-mu=5.0", "rounds=2")
    for cid, entry in plain["privacy"]["clients"].items():
        assert prox["privacy"]["clients"][cid]["history"] == entry["history"]
        assert prox["privacy"]["clients"][cid]["epsilon"] == entry["epsilon"]
    ours = torch.load(tmp_path / "fedprox" / "model.pt")["state_dict"]
    theirs = torch.load(tmp_path / "fedavg" / "model.pt")["state_dict"]
    assert any(not torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_user_level_server_optimizer_steps_on_the_noised_mean(task_identity):
    """DP-FedAdam: the clients' updates are clipped, summed, noised and divided by the
    expected cohort (DP-FedAvg); FedAdam's moments then take that noised mean as their
    pseudo-gradient. Replayed by hand, and unlike Flower's DP wrapper's order (FedAdam on the
    clean mean, the noise after), which would keep un-noised moments."""
    cfg = load_config(CONFIGS_DIR / "tiny.toml", ['strategy.name="fedadam"',
                                                  "privacy.level=user", "num-clients=4",
                                                  "clients-per-round=4"])
    sigma, clip, p, n = 0.8, 1.0, 0.5, 4
    dp = UserLevelDPFedAvg(noise_multiplier=sigma, clip=clip, sample_rate=p, num_clients=n,
                           seed=0, randomness=KnownNoise(),
                           server_optimizer=strategies.server_optimizer(cfg),
                           fraction_evaluate=0.0)
    start = torch.tensor([0.5, -1.0, 2.0])
    updates = {11: torch.tensor([3.0, 0.0, 4.0]), 12: torch.tensor([0.1, 0.2, 0.0]),
               13: torch.tensor([-0.3, 0.0, 0.4]), 14: torch.tensor([0.0, 0.0, 0.0])}
    sent = list(dp.configure_train(1, ArrayRecord({"w": start}), ConfigRecord({}),
                                   ConnectedNodes(list(updates))))
    replies = [Message(RecordDict({
        "arrays": ArrayRecord({"w": start + updates[m.metadata.dst_node_id]}),
        "metrics": MetricRecord({"client-id": m.metadata.dst_node_id, "num-examples": 1})}),
        reply_to=m) for m in sent]
    arrays, _ = dp.aggregate_train(1, replies)
    ours = arrays.to_torch_state_dict()["w"].double()

    clipped = sum(u * min(1.0, clip / float(u.norm())) if u.norm() > 0 else u
                  for u in updates.values())
    noised_mean = (clipped + 0.7 * sigma * clip) / (p * n)
    s = cfg.strategy
    eta, b1, b2, tau = 0.1 if not s.server_lr else s.server_lr, s.beta1, s.beta2, s.tau

    def adam(delta):  # Reddi et al. 2021, Algorithm 2, first step, as Flower writes it
        m, v = (1 - b1) * delta, (1 - b2) * delta ** 2
        eta_norm = eta * np.sqrt(1 - b2 ** 2) / (1 - b1 ** 2)
        return start.double() + eta_norm * m / (np.sqrt(v) + tau)

    assert torch.allclose(ours, adam(noised_mean.double()), atol=1e-6)
    flowers_order = adam((clipped / (p * n)).double()) + 0.7 * sigma * clip / (p * n)
    assert not torch.allclose(ours, flowers_order, atol=1e-3)


def test_step_on_aggregate_is_flowers_step_on_one_reply(task_identity):
    """The adapter gives the step Flower's FedAvgM takes when the average is the aggregate."""
    cfg = load_config(CONFIGS_DIR / "tiny.toml", ['strategy.name="fedavgm"',
                                                  "strategy.server-lr=0.5"])
    optimizer = strategies.server_optimizer(cfg)
    start, aggregate = {"w": torch.zeros(2)}, {"w": torch.tensor([1.0, -2.0])}
    first = step_on_aggregate(optimizer, 1, start, aggregate)["w"]
    assert torch.allclose(first.float(), torch.tensor([0.5, -1.0]))  # lr · (agg − w)
    second = step_on_aggregate(optimizer, 2, {"w": first}, {"w": first + 1.0})["w"]
    momentum = cfg.strategy.server_momentum * torch.tensor([-1.0, 2.0]) + (-1.0)
    assert torch.allclose(second.float(), (first - 0.5 * momentum).float())


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_user_level_with_a_server_optimizer_spends_what_fedavg_spends(tmp_path):
    plain, _ = simulate(tmp_path / "fedavg", "privacy.level=user", "rounds=2")
    adam, _ = simulate(tmp_path / "fedadam", "privacy.level=user", 'strategy.name="fedadam"',
                       "rounds=2")
    assert adam["status"] == "complete"
    # (each run's ledger lives in its own run directory)
    spent = [{k: v for k, v in s["privacy"]["user_level"].items() if k != "ledger"}
             for s in (adam, plain)]
    assert spent[0] == spent[1]


STRATEGY_MODULE = """
from pathlib import Path
from flwr.serverapp.strategy import FedAvg


class Marking(FedAvg):
    def aggregate_train(self, server_round, replies):
        Path("{mark}").open("a").write(f"round {{server_round}}\\n")
        return super().aggregate_train(server_round, replies)


class NotAStrategy:
    pass


class NeedsScale(FedAvg):
    def __init__(self, scale, **kwargs):
        super().__init__(**kwargs)
"""


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_a_users_strategy_by_import_path(tmp_path, monkeypatch):
    """A FedAvg subclass in the user's folder runs under privet's recording; anything else is
    one line."""
    mark = tmp_path / "rounds.txt"
    (tmp_path / "my_strategies.py").write_text(STRATEGY_MODULE.format(mark=mark))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    code, stdout = simulate_any(tmp_path / "run", 'strategy.name="my_strategies:Marking"',
                                "rounds=2")
    assert code == 0, stdout[-3000:]
    assert mark.read_text().split("\n")[:2] == ["round 1", "round 2"]
    code, stdout = simulate_any(tmp_path / "bad", 'strategy.name="my_strategies:NotAStrategy"')
    assert code == 2 and "subclass of Flower's" in one_error_line(stdout)
    code, stdout = simulate_any(tmp_path / "gone", 'strategy.name="my_strategies:Gone"')
    assert code == 2 and "has no 'Gone'" in one_error_line(stdout)
    code, stdout = simulate_any(tmp_path / "init", 'strategy.name="my_strategies:NeedsScale"')
    assert code == 2 and "building it with FedAvg's keyword arguments failed" in \
        one_error_line(stdout)


def test_a_trimmed_mean_that_would_trim_nothing_is_refused():
    with pytest.raises(ConfigError, match="cuts ⌊0.2·3⌋ = 0 updates"):
        load_config(CONFIGS_DIR / "tiny.toml", ['strategy.name="trimmed-mean"',
                                                "strategy.trim-beta=0.2"])
    load_config(CONFIGS_DIR / "tiny.toml", ['strategy.name="trimmed-mean"',
                                            "strategy.trim-beta=0.34"])
