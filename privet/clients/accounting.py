"""A client's side of privacy accounting: where its ledger lives, where its noise comes from,
and the DP-SGD plan that keeps every one of its rows within the target.

Nothing here reads a message: clients/app.py unpacks them and calls these.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys

from flwr.app import ConfigRecord, Context

from privet.clients import metrics
from privet.clients.preprocessing import planned
from privet.clients.train import sample_rate, steps_per_epoch
from privet.common.config import ExperimentConfig
from privet.common.data.datasets import client_digests, digest_columns, source_name
from privet.common.privacy import accountants
from privet.common.privacy.ledger import (ALL_ROWS, DataLedger, LedgerDir, MemoryStore,
                                          RunFileStore, Spend, SpendRecord)
from privet.common.privacy.randomness import resolve_noise_source

LEDGER_KEY = "privacy-ledger"
RUN_LEDGERS = "ledgers"  # a simulation's ledgers in its run directory (common.results.LEDGERS)
RUN_CLIENTAPP = "flwr.supernode.runtime.run_clientapp"  # how a SuperNode runs a ClientApp


def client_id(context: Context) -> int:
    """The participant's number: Flower's simulation sets it; a deployed node names it in
    `--node-config "partition-id=<0..num-clients-1> data-path=<its file>"`."""
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"node config {dict(context.node_config)}: expected partition-id=<client number> "
            "(and data-path=<file> when the node reads its own data)") from None


def data_path(context: Context) -> str:
    """A deployed node's own data file (`--node-config "data-path=..."`); "" in simulation."""
    return str(context.node_config.get("data-path", ""))


def deployed(context: Context) -> bool:
    """A node of a real deployment: this process runs the ClientApp the way a SuperNode does
    (Flower's `run_clientapp`, loaded by `flwr-clientapp` and by privet's launcher, never by
    the simulation engine), or the node names its own data, or the simulation engine did not
    number it. A deployed node's `--node-config` may carry `num-partitions` too, so that
    alone says nothing."""
    node = context.node_config
    return (RUN_CLIENTAPP in sys.modules or "data-path" in node
            or "num-partitions" not in node)


def min_noise(context: Context) -> float | None:
    """The node's floor on its DP-SGD noise multiplier (node-config `min-noise`, set by
    `privet deploy supernode --min-noise`); None when it has none."""
    value = context.node_config.get("min-noise")
    if value in (None, ""):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"node-config min-noise = {value!r}: expected a number") from None


def noise_source(cfg: ExperimentConfig, context: Context) -> str:
    """"seeded" or "secure" (raises NoiseSourceError when a deployed node is asked to seed)."""
    return resolve_noise_source(cfg.privacy.noise_source, deployed(context),
                                f"node partition-id={client_id(context)}")


class StateStore(MemoryStore):
    """A ledger that lives in the node's context.state under `key`: with the run, and only
    with it."""

    def __init__(self, state, key: str = LEDGER_KEY) -> None:
        found = MemoryStore.from_json(str(state[key]["json"])) if key in state \
            else MemoryStore()
        super().__init__(found.records())
        self.state, self.key = state, key

    def save(self, record: SpendRecord) -> None:
        super().save(record)
        self.state[self.key] = ConfigRecord({"json": self.to_json()})


def redo_seed(seed: int, attempt: int) -> int:
    """The seed of a release's `attempt`-th payment (DataLedger.attempt; 0: `seed` itself): a
    redo on other inputs never draws the noise of a release already made (63 bits of
    BLAKE2b)."""
    if not attempt:
        return seed
    return int.from_bytes(hashlib.blake2b(f"{seed}|{attempt}".encode(), digest_size=8)
                          .digest(), "little") >> 1


@functools.lru_cache(maxsize=8)
def _ledger_dir(directory: str) -> LedgerDir:
    return LedgerDir(directory)  # kept: it remembers the row sets it has read


def open_ledger(cfg: ExperimentConfig, context: Context, client: int, run: str
                ) -> DataLedger:
    """This client's ledger: on disk when the node says where (`ledger-dir`, or the folder of
    its `data-path`) or the experiment sets `privacy.ledger-dir`; otherwise for this run
    only: a simulated client's in the run directory (`ledgers/client-<id>.json`, so that a
    resumed run continues it) where this machine sees it, else in context.state. Raises LedgerError when a ledger on
    disk cannot be trusted."""
    node, path = context.node_config, data_path(context)
    if "ledger-dir" in node:
        directory = str(node["ledger-dir"])
    elif path:
        directory = os.path.dirname(os.path.abspath(path))
    else:
        directory = cfg.privacy.ledger_dir
    if directory:
        store = _ledger_dir(os.path.abspath(directory))
    elif cfg.out_dir and not deployed(context) and os.path.isdir(cfg.out_dir):
        # (a Ray worker on another machine does not see the run directory: in memory then,
        # and the run cannot be resumed; server.checkpoint.check_ledgers says so)
        store = RunFileStore(os.path.join(cfg.out_dir, RUN_LEDGERS, f"client-{client}.json"))
    else:
        store = StateStore(context.state)
    digests = None if isinstance(store, MemoryStore) else client_digests(cfg, client, path)
    current = SpendRecord(f"{run or 'run'}-client{client}", run, str(client),
                          source_name(cfg, path), ALL_ROWS, noise_source(cfg, context),
                          columns=() if digests is None else digest_columns(cfg, path))
    return DataLedger(store, current, digests)


def planned_noise(cfg: ExperimentConfig, num_rows: int, target_epsilon: float,
                  ledger: DataLedger, planned_before: tuple[Spend, ...] = ()
                  ) -> tuple[float, float, int] | None:
    """(σ, q, steps per round) calibrated once for the whole run's horizon, or None when
    earlier runs on these rows left no budget.

    The horizon assumes the client trains in every round, the worst case under client
    sampling; σ is the largest any group of its rows needs after what earlier runs spent on
    it and this run's preprocessing (`planned_before`), so no row can pass the target."""
    q = sample_rate(num_rows, cfg.train.batch_size)
    steps = cfg.train.local_epochs * steps_per_epoch(num_rows, cfg.train.batch_size)
    sigma = accountants.calibrate_after(
        target_epsilon, cfg.privacy.delta, q, steps * cfg.rounds, cfg.privacy.accountant,
        ledger.prior_histories(), tuple(s.as_entry() for s in planned_before))
    return None if sigma is None else (sigma, q, steps)


def plan(cfg: ExperimentConfig, client: int, path: str, ledger: DataLedger, rows: int
         ) -> tuple[float, float, int] | None:
    """The run's DP-SGD plan for a private client with `rows` training rows, after its
    planned preprocessing and noised training metrics; None when earlier runs on its rows
    left no budget for it (nothing may then be spent: not even its preprocessing fit)."""
    return planned_noise(cfg, rows, cfg.epsilon_for(client), ledger,
                         planned(cfg, client, path) + metrics.planned(cfg, client))
