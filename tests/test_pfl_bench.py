"""`python -m experiments.bench --vs-pfl`: pfl's side (experiments/pfl_digits.py) trains on the
very split and users privet's side does, with the same numbers; pfl itself is not needed."""

import numpy as np

from experiments import pfl_digits
from experiments.bench import VS_PFL
from privet.common.config import load_config
from privet.common.data import datasets
from privet.common.data.datasets import client_data, partitions


def _privet_config():
    return load_config(VS_PFL.config, list(VS_PFL.overrides))


def test_the_workload_is_the_same_on_both_sides():
    cfg = _privet_config()
    pfl = pfl_digits.parser().parse_args([])
    assert (cfg.seed, cfg.num_clients, cfg.clients_per_round, cfg.rounds) == (
        pfl.seed, pfl.clients, pfl.per_round, pfl.rounds)
    assert (cfg.train.local_epochs, cfg.train.batch_size, cfg.train.lr, cfg.train.hidden) == (
        pfl.epochs, pfl.batch_size, pfl.lr, pfl.hidden)
    assert cfg.data.test_fraction == pfl.test_fraction
    assert (cfg.data.dataset, cfg.data.partition, cfg.train.model) == ("digits", "iid", "mlp")
    assert cfg.train.momentum == 0 and not cfg.private and not cfg.user_level
    assert (cfg.strategy.name, cfg.strategy.weighting, cfg.evaluation.mode) == (
        "fedavg", "uniform", "server")  # pfl: FedAvg, WeightByUser, central evaluation


def test_pfl_gets_privets_split_and_users():
    cfg = _privet_config()
    train_x, test_x, train_y, test_y = pfl_digits.digits(cfg.seed, cfg.data.test_fraction)
    users = pfl_digits.iid(len(train_y), cfg.num_clients, cfg.seed)
    assert len(users) == len(partitions(cfg)) == 100
    assert all(np.array_equal(a, b) for a, b in zip(users, partitions(cfg)))
    for client in (0, 41, 99):
        mine = client_data(cfg, client)
        assert np.array_equal(mine.features, train_x[users[client]])
        assert np.array_equal(mine.labels, train_y[users[client]])
    held_out = datasets.test_data(cfg)
    assert np.array_equal(held_out.features, test_x)
    assert np.array_equal(held_out.labels, test_y)
