"""Server strategies by name (`[strategy] name`): Flower's strategy classes, each wrapped
once with privet's recording, sampling and failure handling (server.strategy.PrivetFedAvg).

With sample-level DP every client's update is already private when it arrives, so any
aggregation of the updates (an average, a server optimizer, a median) is post-processing
and the ε is unchanged. User-level DP clips and noises a sum of updates (DP-FedAvg): only
`fedavg` is combined with it here (see `check`).
"""

from __future__ import annotations

from importlib import import_module

from privet.common.config import ExperimentConfig

# name -> (module in this package, class): one strategy per file, citing its paper
STRATEGIES = {
    "fedavg": ("privet.server.strategy", "PrivetFedAvg"),
    "fedavgm": ("privet.server.strategies.fedavgm", "PrivetFedAvgM"),
    "fedadam": ("privet.server.strategies.fedadam", "PrivetFedAdam"),
    "fedyogi": ("privet.server.strategies.fedyogi", "PrivetFedYogi"),
    "fedadagrad": ("privet.server.strategies.fedadagrad", "PrivetFedAdagrad"),
    "trimmed-mean": ("privet.server.strategies.trimmed_mean", "PrivetFedTrimmedAvg"),
    "median": ("privet.server.strategies.median", "PrivetFedMedian"),
    "krum": ("privet.server.strategies.krum", "PrivetMultiKrum"),
}


def strategy_class(name: str):
    """The class `[strategy] name` names (raises KeyError for an unknown name; the config
    refuses those first)."""
    module, attr = STRATEGIES[name]
    return getattr(import_module(module), attr)


def options(cfg: ExperimentConfig) -> dict:
    """Keyword arguments of the chosen strategy's class, from `[strategy]`: privet's
    weighting (for the strategies that average) and Flower's own."""
    s = cfg.strategy
    if s.name in ("trimmed-mean", "median", "krum"):
        weighting = {}  # their aggregates weigh no client more than another
    else:
        weighting = {"weighting": s.weighting}
    return {**weighting, **flower_options(cfg)}


def flower_options(cfg: ExperimentConfig) -> dict:
    """The arguments of the strategy's Flower class, from `[strategy]`."""
    s = cfg.strategy
    lr = {"server_learning_rate" if s.name == "fedavgm" else "eta": s.server_lr} \
        if s.server_lr else {}  # 0: Flower's default for the strategy
    if s.name == "fedavgm":
        return {**lr, "server_momentum": s.server_momentum}
    if s.name in ("fedadam", "fedyogi"):
        return {**lr, "eta_l": cfg.train.lr, "beta_1": s.beta1, "beta_2": s.beta2,
                "tau": s.tau}
    if s.name == "fedadagrad":
        return {**lr, "eta_l": cfg.train.lr, "tau": s.tau}
    if s.name == "trimmed-mean":
        return {"beta": s.trim_beta}
    if s.name == "krum":
        return {"num_malicious_nodes": s.byzantine, "num_nodes_to_select": s.multi}
    return {}
