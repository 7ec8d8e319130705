"""Which transform a client encodes its rows with, and what fitting it spends.

- shared: the server's federated transform (`preprocess.fit = "federated"`), whose noised
  statistics the client paid for when it sent them;
- public: options that need no statistics of the rows (declared bounds, constant fills,
  missing categories to `other`): nothing to spend;
- private: a client that trains with DP-SGD fits on its own training rows from their noised
  statistics (`federated.fit_private`), charged once per run to its ledger as "local-fit"
  before anything trained on them leaves it. The fitted transform is kept in the run's
  ledger record, so a restarted node or another simulation worker reuses it instead of
  spending again;
- exact: a client without sample-level DP (level "user" or "none", or ε = inf) fits on its own
  rows exactly. Under user-level DP that fit is part of the update the server clips; with
  `preprocess.epsilon = inf` it is outside every ε, and the run's output says so.
"""

from __future__ import annotations

from privet.common.config import ExperimentConfig
from privet.common.data import federated
from privet.common.data.datasets import cleaned_client, schema
from privet.common.privacy.ledger import BudgetDeclined, DataLedger, Spend
from privet.common.privacy.randomness import make_randomness

LOCAL_FIT_STREAM = 0x10CA1F17  # seeded draws of the local fit: (seed, client, this)


def planned(cfg: ExperimentConfig, client_id: int, data_path: str = "") -> tuple[Spend, ...]:
    """The preprocessing spend a client plans before its DP-SGD steps (their σ is calibrated
    for what it leaves of the target): one Gaussian per statistics round, q = 1."""
    if not cfg.client_private(client_id):
        return ()
    table = _schema(cfg, data_path)
    kind = federated.fit_kind(cfg, client_id, table)
    bounds = ("bounds",) if table and federated.missing_bounds(table) else ()
    if kind == "shared":
        sigma, _ = federated.statistics_noise(cfg, table)
        stages = bounds + ("statistics",) + (("pca",) if cfg.preprocess.pca else ())
    elif kind == "private":
        sigma, _ = federated.local_fit_noise(cfg, table)
        stages = bounds + ("local-fit",)
    else:
        return ()
    return tuple(Spend(sigma, 1.0, 1, stage) for stage in stages) if sigma else ()


def _schema(cfg: ExperimentConfig, data_path: str):
    return schema(cfg, data_path) if cfg.data.tabular else None


def own_transform(cfg: ExperimentConfig, client_id: int, data_path: str, shared: str,
                  ledger: DataLedger) -> str:
    """The transform (JSON) to encode this client's rows with; "" = fit exactly on its own
    rows (no DP needed, see module doc). May spend: the private fit, once per run; raises
    BudgetDeclined when its rows cannot pay for it."""
    table = _schema(cfg, data_path)
    kind = federated.fit_kind(cfg, client_id, table)
    if kind in ("shared", "none", "exact"):
        return shared
    if kind == "public":
        return federated.fit_public(table, cfg.preprocess).to_json()
    if ledger.current.transform:
        return ledger.current.transform
    frame, labels, _ = cleaned_client(cfg, client_id, data_path)
    randomness = make_randomness(ledger.current.noise_source,
                                 [cfg.seed, client_id, LOCAL_FIT_STREAM])
    sigma, _ = federated.local_fit_noise(cfg, table)
    if ledger.reserve(planned(cfg, client_id, data_path), cfg.epsilon_for(client_id),
                      cfg.privacy.delta, cfg.privacy.accountant) is None:  # paid first
        raise BudgetDeclined(f"client {client_id}: its rows have no budget left for the fit "
                             "of its preprocessing")
    fitted = federated.fit_private(frame, labels, table, cfg.preprocess, sigma, randomness)
    ledger.current.transform = fitted.to_json()
    ledger.store.save(ledger.current)  # kept: a restarted node reuses it, paying nothing
    return ledger.current.transform
