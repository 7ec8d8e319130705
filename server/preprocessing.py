"""Federated preprocessing, server side: ask every client for noised statistics, fit one
shared transform, and hand it to the rounds that follow.

Every client takes part (not a sampled cohort): the transform must describe all of them.
"""

from __future__ import annotations

import logging

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from common import records as R
from common.config import ExperimentConfig
from common.data import federated
from common.data.datasets import schema
from common.data.preprocess import FittedTransform

log = logging.getLogger("flwr")
TIMEOUT_SECONDS = 600


def _collect(grid: Grid, stage: str, transform: FittedTransform | None = None
             ) -> list[federated.Statistics]:
    config = {R.STAGE: stage, "server-round": 0}
    if transform is not None:
        config[R.TRANSFORM] = transform.to_json()
    messages = [Message(RecordDict({"config": ConfigRecord(config)}), dst_node_id=node,
                        message_type="query") for node in grid.get_node_ids()]
    replies = list(grid.send_and_receive(messages, timeout=TIMEOUT_SECONDS))
    failed = [r.error.reason for r in replies if r.has_error()]
    if failed or len(replies) < len(messages):
        raise RuntimeError(f"federated preprocessing ({stage}): {len(replies) - len(failed)} "
                           f"of {len(messages)} clients replied; errors: {failed[:3]}")
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
