"""Federated preprocessing, server side: ask every client for noised statistics, fit one
shared transform, and hand it to the rounds that follow.

Every client takes part (not a sampled cohort): the transform must describe all of them.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from flwr.app import ConfigRecord, Message
from flwr.serverapp import Grid

from privet.common import records as R
from privet.common.config import ExperimentConfig
from privet.common.data import federated
from privet.common.data.datasets import schema
from privet.common.data.preprocess import FittedTransform
from privet.server.accounting import BudgetExhausted
from privet.server.queries import ask_every_client
from privet.server.strategy import NoClientsLeft

log = logging.getLogger("flwr")


# (client id, its reply): what answering cost it, or that it declined, for the run's report
SpendObserver = Callable[[str, Message], None]


def _collect(grid: Grid, stage: str, run: str, on_spend: SpendObserver | None,
             extra: dict | None = None) -> list[federated.Statistics]:
    """Every client's noised statistics of `stage`; those that decline (no budget left) are
    left out, and a stage no client answers ends the run (BudgetExhausted)."""
    config = {R.STAGE: stage, "server-round": 0, R.RUN: run, **(extra or {})}
    replies = ask_every_client(grid, ConfigRecord(config), "query",
                               f"federated preprocessing ({stage})")
    if on_spend is not None:
        for r in replies:
            on_spend(str(int(r.content["metrics"][R.CLIENT_ID])), r)
    answered = [r for r in replies if "statistics" in r.content]
    failed = [r for r in replies if "statistics" not in r.content and not r.has_error()
              and int(r.content["metrics"].get(R.FAILED, 0))]
    if not answered and failed:
        first = failed[0]
        raise NoClientsLeft(
            f"every client failed to send preprocessing statistics ({stage}); client "
            f"{int(first.content['metrics'][R.CLIENT_ID])}: "
            f"{first.content[R.FAILURE].get('reason', 'unknown')}")
    if not answered:
        raise BudgetExhausted(f"no client has budget left to send preprocessing statistics "
                              f"({stage}): earlier runs on their rows spent it, or this run's "
                              "preprocessing and noised metrics (preprocess.epsilon, "
                              "privacy.train-metrics-epsilon) alone would pass the target")
    if len(answered) < len(replies):
        log.warning("privet: of %d clients, %d failed and %d declined (no budget left) to "
                    "send statistics; the shared transform is fitted from the others",
                    len(replies), len(failed), len(replies) - len(answered) - len(failed))
    return [{name: array.numpy() for name, array in r.content["statistics"].items()}
            for r in answered]


def fit_shared_transform(grid: Grid, cfg: ExperimentConfig, run: str = "",
                         on_spend: SpendObserver | None = None
                         ) -> tuple[FittedTransform, dict[str, tuple[float, float]]]:
    """The shared transform, and the ranges it estimated with DP for numeric columns that
    have no declared data.bounds."""
    table = schema(cfg)
    sigma, rounds = federated.statistics_noise(cfg, table)
    log.info("privet: federated preprocessing over %d clients, %d round(s), σ = %.3f "
             "(ε = %s of each client's budget)", len(list(grid.get_node_ids())), rounds,
             sigma, cfg.preprocess.epsilon if sigma else "none: exact statistics")
    missing = federated.missing_bounds(table)
    estimated: dict[str, tuple[float, float]] = {}
    if missing:
        replies = _collect(grid, "bounds", run, on_spend)
        # every client adds its own noise: the sum carries sqrt(clients) times as much
        noise_std = sigma * federated.bounds_sensitivity(missing) * len(replies) ** 0.5
        estimated = federated.fit_bounds(federated.sum_statistics(replies), missing, noise_std)
        table = federated.with_bounds(table, estimated)
        log.info("privet: ranges estimated with DP for %s", ", ".join(
            f"{c} [{low:g}, {high:g}]" for c, (low, high) in estimated.items()))
    replies = _collect(grid, "statistics", run, on_spend,
                       {R.BOUNDS: json.dumps(estimated)} if estimated else None)
    totals = federated.sum_statistics(replies)
    noise_std = sigma * federated.stats_sensitivity(table) * len(replies) ** 0.5
    transform = federated.fit_federated(totals, table, cfg.preprocess, noise_std)
    if cfg.preprocess.pca:
        pca = federated.sum_statistics(_collect(grid, "pca", run, on_spend,
                                                {R.TRANSFORM: transform.to_json()}))
        d = len(transform.feature_names())
        mean, components = federated.fit_pca(pca, federated.pca_clip_norm(d), cfg.preprocess.pca)
        transform = FittedTransform(transform.numeric, transform.categorical, transform.keep,
                                    mean, components)
    log.info("privet: shared transform: %d features", len(transform.feature_names()))
    return transform, estimated
