"""Server strategies by name (`[strategy] name`): Flower's strategy classes, each wrapped
once with privet's recording, sampling and failure handling (server.strategy.PrivetFedAvg).

With sample-level DP every client's update is already private when it arrives, so any
aggregation of the updates (an average, a server optimizer, a median) is post-processing
and the ε is unchanged. User-level DP clips and noises a sum of updates (DP-FedAvg): `fedavg`
and `fedprox` (FedAvg on the server) take its noised mean as the new model, and the server
optimizers step on that noised mean (after_noise.py); robust aggregates and users'
strategies are refused with it, with the reason (config.USER_LEVEL_STRATEGIES).

A user's strategy is named by import path, `package.module:Class`: a subclass of Flower's
`flwr.serverapp.strategy.FedAvg` whose `__init__` takes FedAvg's keyword arguments. privet
puts its recording, sampling and failure handling in front of it, as for its own.
"""

from __future__ import annotations

from importlib import import_module

from privet.common.config import ConfigError, ExperimentConfig, is_import_path

# name -> (module in this package, class): one strategy per file, citing its paper
STRATEGIES = {
    "fedavg": ("privet.server.strategy", "PrivetFedAvg"),
    "fedavgm": ("privet.server.strategies.fedavgm", "PrivetFedAvgM"),
    "fedprox": ("privet.server.strategies.fedprox", "PrivetFedProx"),
    "fedadam": ("privet.server.strategies.fedadam", "PrivetFedAdam"),
    "fedyogi": ("privet.server.strategies.fedyogi", "PrivetFedYogi"),
    "fedadagrad": ("privet.server.strategies.fedadagrad", "PrivetFedAdagrad"),
    "trimmed-mean": ("privet.server.strategies.trimmed_mean", "PrivetFedTrimmedAvg"),
    "median": ("privet.server.strategies.median", "PrivetFedMedian"),
    "krum": ("privet.server.strategies.krum", "PrivetMultiKrum"),
}


def strategy_class(name: str):
    """The class `[strategy] name` names: privet's, or for an import path the user's class
    under privet's recording (`PrivetFedAvg` first in its method order). Raises ConfigError
    (one line) for an import path that does not name a FedAvg subclass, KeyError for an
    unknown name (the config refuses those first)."""
    if not is_import_path(name):
        module, attr = STRATEGIES[name]
        return getattr(import_module(module), attr)
    from flwr.serverapp.strategy import FedAvg

    from privet.common.imports import import_attr
    from privet.server.strategy import PrivetFedAvg

    found = import_attr(name, "strategy.name", ConfigError, "strategy class")
    if not (isinstance(found, type) and issubclass(found, FedAvg)):
        raise ConfigError(f"strategy.name = {name!r}: expected a subclass of Flower's "
                          "flwr.serverapp.strategy.FedAvg, got "
                          f"{getattr(found, '__name__', type(found).__name__)!r}")
    if issubclass(found, PrivetFedAvg):
        return found
    return type(f"Privet{found.__name__}", (PrivetFedAvg, found),
                {"__doc__": f"{found.__name__} ({found.__module__}) with privet's recording"})


# the server optimizers, by their Flower classes: stepped after the noise at user level
SERVER_OPTIMIZERS = {"fedavgm": "FedAvgM", "fedadam": "FedAdam", "fedyogi": "FedYogi",
                     "fedadagrad": "FedAdagrad"}


def server_optimizer(cfg: ExperimentConfig):
    """Flower's optimizer strategy that user-level DP steps on its noised mean
    (after_noise.step_on_aggregate), or None where the mean is the new model (fedavg,
    fedprox)."""
    if cfg.strategy.name not in SERVER_OPTIMIZERS:
        return None
    from flwr.serverapp import strategy as flower

    chosen = getattr(flower, SERVER_OPTIMIZERS[cfg.strategy.name])
    return chosen(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                  min_evaluate_nodes=0, min_available_nodes=1, **flower_options(cfg))


def options(cfg: ExperimentConfig) -> dict:
    """Keyword arguments of the chosen strategy's class, from `[strategy]`: privet's
    weighting (for the strategies that average) and Flower's own."""
    s = cfg.strategy
    if is_import_path(s.name):
        return {"weighting": s.weighting}  # the user's class takes FedAvg's arguments
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
    if s.name == "fedprox":
        return {"proximal_mu": s.proximal_mu}
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
