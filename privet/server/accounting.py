"""The server's user-level ledger: what DP-FedAvg has spent of each participant's budget,
over every run of the federation.

Each round of DP-FedAvg is one Poisson-subsampled Gaussian mechanism on every participant
(sampled or not: amplification by sampling is what makes that so), so a run's record lists
every participant of the federation and its rounds. Participants are named by their client
id (simulation: within the data source; deployment: a node's partition-id). Records are kept
like clients' ledgers (`common.privacy.ledger`): in memory for a simulation without
`privacy.ledger-dir`, else on disk under `<ledger-dir>/.privet-ledger/user-level/` with a
second copy under the state directory; a deployed ServerApp without `ledger-dir` keeps them
under the state directory of the SuperLink's machine. A later run calibrates its noise for
what earlier runs left and never passes `privacy.user-epsilon`.
"""

from __future__ import annotations

from pathlib import Path

from privet.common.config import ExperimentConfig
from privet.common.data.datasets import source_name
from privet.common.privacy import accountants
from privet.common.privacy.ledger import (
    ALL_ROWS,
    DataLedger,
    LedgerDir,
    MemoryStore,
    RunFileStore,
    Spend,
    SpendRecord,
    row_digests,
    state_dir,
)

PURPOSE = "dp-fedavg"


class BudgetExhausted(Exception):
    """Too few clients (or participants) have privacy budget left to go on: the run ends with
    status "budget-exhausted"."""


def user_ledger(cfg: ExperimentConfig, run: str, deployed: bool, noise_source: str,
                run_dir: Path | None = None) -> DataLedger:
    """The participants' user-level ledger for this run: at `privacy.ledger-dir`, in the
    state directory when deployed, else for this run only, in `run_dir` (ledgers/, so that a
    resumed run continues it) or in memory. Raises LedgerError when a ledger on disk cannot
    be trusted."""
    directory = cfg.privacy.ledger_dir or (str(state_dir() / "server-ledger") if deployed
                                           else "")
    if directory:
        store = LedgerDir(directory, part="user-level")
    elif run_dir is not None:
        store = RunFileStore(Path(run_dir) / "ledgers" / "user-level.json")  # results.LEDGERS
    else:
        store = MemoryStore()
    federation = "deployment" if deployed else source_name(cfg)
    participants = row_digests([federation, "participant", i] for i in range(cfg.num_clients))
    current = SpendRecord(f"{run}-user-level", run, "server", federation, ALL_ROWS,
                          noise_source)
    return DataLedger(store, current, None if isinstance(store, MemoryStore)
                      else participants)


def calibrate(cfg: ExperimentConfig, ledger: DataLedger) -> float | None:
    """The noise multiplier σ for `rounds` rounds at client sampling rate p that keeps every
    participant within `user-epsilon` after what earlier runs spent on it; None when earlier
    runs have spent it all."""
    p = cfg.privacy
    return accountants.calibrate_after(p.user_epsilon, p.delta, cfg.client_sample_rate,
                                       cfg.rounds, p.accountant, ledger.prior_histories())


def reserve_round(cfg: ExperimentConfig, ledger: DataLedger, noise_multiplier: float,
                  sample_rate: float, release: tuple[str, str] | None = None
                  ) -> float | None:
    """One more round of DP-FedAvg on every participant, recorded before it runs if it keeps
    them within `user-epsilon` (checked under the ledger's lock); the ε after, or None.
    `release`: (round name, fingerprint of its inputs), see DataLedger.reserve."""
    p = cfg.privacy
    return ledger.reserve([Spend(noise_multiplier, sample_rate, 1, PURPOSE)], p.user_epsilon,
                          p.delta, p.accountant, release)
