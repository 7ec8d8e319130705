"""Federated preprocessing, server side: ask every client for noised statistics, fit one
shared transform, and hand it to the rounds that follow.

Every client takes part (not a sampled cohort): the transform must describe all of them.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from common import records as R
from common.config import ExperimentConfig
from common.data import federated
from common.data.datasets import schema
from common.data.preprocess import FittedTransform
from server.queries import ask_every_client

log = logging.getLogger("flwr")


def _collect(grid: Grid, stage: str, transform: FittedTransform | None = None
             ) -> list[federated.Statistics]:
    config = {R.STAGE: stage, "server-round": 0}
    if transform is not None:
        config[R.TRANSFORM] = transform.to_json()
    replies = ask_every_client(grid, ConfigRecord(config), "query",
                               f"federated preprocessing ({stage})")
    return [{name: array.numpy() for name, array in r.content["statistics"].items()}
            for r in replies]


def fit_shared_transform(grid: Grid, cfg: ExperimentConfig) -> FittedTransform:
    sigma, rounds = federated.statistics_noise(cfg)
    log.info("privet: federated preprocessing over %d clients, %d round(s), σ = %.3f "
             "(ε = %s of each client's budget)", len(list(grid.get_node_ids())), rounds,
             sigma, cfg.preprocess.epsilon)
    table = schema(cfg)
    replies = _collect(grid, "statistics")
    totals = federated.sum_statistics(replies)
    # every client adds its own noise: the sum carries sqrt(clients) times as much
    noise_std = sigma * federated.stats_sensitivity(table) * len(replies) ** 0.5
    transform = federated.fit_federated(totals, table, cfg.preprocess, noise_std)
    if cfg.preprocess.pca:
        pca = federated.sum_statistics(_collect(grid, "pca", transform))
        d = len(transform.feature_names())
        mean, components = federated.fit_pca(pca, federated.pca_clip_norm(d), cfg.preprocess.pca)
        transform = FittedTransform(transform.numeric, transform.categorical, transform.keep,
                                    mean, components)
    log.info("privet: shared transform: %d features", len(transform.feature_names()))
    return transform
