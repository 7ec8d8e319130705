"""The privacy plan of drift mode: every window's rows have their own budget.

A row arrives in one window and is only ever touched in that window's rounds: once by the
window's monitoring release (one Gaussian mechanism, noise multiplier `drift.monitor-noise`
relative to the vector's L2 sensitivity), then by DP-SGD in each of the window's rounds that
trains. So a window's ledger composes exactly those, and its target is the client's
`privacy.epsilon`: event-level DP over time, one row of one window, against the server and
anyone who sees the models and signals. A participant who contributes rows to many windows
composes over them (user-level over time is not what is accounted; the README says so).

DP-SGD's σ is calibrated per window for the window's whole horizon (every one of its
`rounds-per-window` rounds training, the worst case) after the monitoring spend, with
privet's accountants (PLD by default), so no window's row can pass its target.
"""

from __future__ import annotations

from privet.clients.train import sample_rate, steps_per_epoch
from privet.common.config import ConfigError, ExperimentConfig
from privet.common.privacy import accountants
from privet.common.privacy.ledger import Spend

MONITOR = "drift-monitor"


def monitor_spend(cfg: ExperimentConfig) -> Spend:
    return Spend(cfg.drift.monitor_noise, 1.0, 1, MONITOR)


def monitor_epsilon(cfg: ExperimentConfig) -> float:
    """ε of one window's monitoring release alone, at `privacy.delta`."""
    return accountants.epsilon([monitor_spend(cfg).as_entry()], cfg.privacy.delta,
                               cfg.privacy.accountant)


def check(cfg: ExperimentConfig) -> None:
    """Raises ConfigError when a window's monitoring alone reaches the per-window target."""
    if not cfg.private:
        return
    spent = monitor_epsilon(cfg)
    if spent >= cfg.privacy.epsilon:
        raise ConfigError(f"drift.monitor-noise = {cfg.drift.monitor_noise}: each window's "
                          f"monitoring alone spends ε = {spent:.3g} ≥ privacy.epsilon = "
                          f"{cfg.privacy.epsilon}; raise the noise or the target")


def plan(cfg: ExperimentConfig, rows: int, target: float) -> tuple[float, float, int]:
    """(σ, q, steps per round) of DP-SGD on a window of `rows` rows: calibrated so that the
    window's monitoring plus `rounds-per-window` rounds of training stay within `target`."""
    q = sample_rate(rows, cfg.train.batch_size)
    steps = cfg.train.local_epochs * steps_per_epoch(rows, cfg.train.batch_size)
    sigma = accountants.calibrate_noise(
        target, cfg.privacy.delta, q, steps * cfg.drift.rounds_per_window,
        cfg.privacy.accountant, prior=(monitor_spend(cfg).as_entry(),))
    return sigma, q, steps
