"""Privacy planning without training: ε over rounds for a given σ, or σ for a target ε.

Two levels, as `privet simulate` accounts them:

- sample level (`Plan`): DP-SGD on one client, `steps_per_round` Poisson-sampled steps a
  round, after the preprocessing statistics' release if any; every accountant of
  common.privacy.accountants, as the client's ledger computes ε.
- user level (`UserPlan`): DP-FedAvg (McMahan et al. 2018), one Gaussian release a round
  on a Poisson sample of the participants at q = cohort / users; nothing else is charged at
  user level (server.accounting records (σ, q, 1) per round; preprocessing is fitted locally
  there). The PLD column is dp-accounting's PLD at its default discretisation
  (common.privacy.pld_plan: seconds at 10^6 users, 10^3 a round, 10^4 rounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from privet.common.privacy import pld_plan
from privet.common.privacy.accountants import ACCOUNTANTS, calibrate_noise, epsilon


@dataclass(frozen=True)
class Plan:
    """`rounds` × `steps_per_round` DP-SGD steps at Poisson rate `sample_rate`, after the
    `prior` spend ((σ, q, steps) entries: e.g. the preprocessing statistics), at `delta`."""
    rounds: int
    steps_per_round: int
    sample_rate: float
    delta: float
    prior: tuple[tuple[float, float, int], ...] = ()

    @classmethod
    def from_rows(cls, rows: int, batch_size: int, local_epochs: int, rounds: int,
                  delta: float, prior: tuple = ()) -> "Plan":
        """The rate and steps Opacus' Poisson loader really uses: q = 1/⌈n/B⌉."""
        from privet.clients.train import sample_rate, steps_per_epoch  # torch: not for users

        return cls(rounds, local_epochs * steps_per_epoch(rows, batch_size),
                   sample_rate(rows, batch_size), delta, prior)

    @property
    def steps(self) -> int:
        return self.rounds * self.steps_per_round


@dataclass(frozen=True)
class UserPlan:
    """User-level DP-FedAvg over `rounds` rounds: each of `users` participants joins a round
    with probability q = `cohort` / `users` (Poisson sampling, `cohort` the expected number
    a round: privet simulate's num-clients and clients-per-round), and each round releases
    the clipped sum of their updates plus Gaussian noise σ·S, at `delta`.

    What server.accounting charges each participant: (σ, q, 1) a round, nothing before
    (preprocessing is fitted locally at user level); σ is the effective multiplier of the
    round's release (with adaptive clipping, of the model and count queries together).
    Raises ValueError for a cohort outside 1..users or rounds < 1."""
    users: int
    cohort: int
    rounds: int
    delta: float

    def __post_init__(self) -> None:
        if not 1 <= self.cohort <= self.users:
            raise ValueError(f"cohort {self.cohort}: expected 1 to users ({self.users})")
        if self.rounds < 1:
            raise ValueError(f"rounds {self.rounds}: expected at least 1")

    steps_per_round = 1  # one release a round (class attributes, not fields: the same
    prior = ()           # names as Plan's, so the tables treat both alike)

    @property
    def sample_rate(self) -> float:
        """q = cohort / users, the rate privet simulate's ledger records."""
        return self.cohort / self.users

    @property
    def steps(self) -> int:
        return self.rounds


def release_at(target_epsilon: float, delta: float) -> tuple[tuple[float, float, int], ...]:
    """One Gaussian release over all rows (q = 1) spending `target_epsilon`, as privet's
    federated preprocessing statistics do with declared bounds; () for 0."""
    if not target_epsilon:
        return ()
    return ((calibrate_noise(target_epsilon, delta, 1.0, 1), 1.0, 1),)


def report_rounds(rounds: int, most: int = 20) -> list[int]:
    """At most `most` rounds to tabulate, always including the last."""
    if rounds <= most:
        return list(range(1, rounds + 1))
    step = math.ceil(rounds / most)
    picked = list(range(step, rounds + 1, step))
    return picked if picked[-1] == rounds else picked + [rounds]


def epsilon_over_rounds(plan: Plan | UserPlan, sigma: float, accountants=ACCOUNTANTS
                        ) -> dict[str, list[tuple[int, float]]]:
    """{accountant: [(round, ε after it), ...]} for noise multiplier `sigma`, at the rounds
    `report_rounds` picks (at most ~20, the last included); ε at the plan's δ, inf for
    σ = 0. A user-level plan's PLD column is pld_plan.epsilon_over_rounds (dp-accounting's
    PLD at its default discretisation, composed incrementally); every other column is
    common.privacy.accountants.epsilon of the whole history. Raises ValueError for an
    unknown accountant name."""
    rounds = report_rounds(plan.rounds)
    curves = {}
    for name in accountants:
        if isinstance(plan, UserPlan) and name == "pld":
            curves[name] = list(zip(rounds, pld_plan.epsilon_over_rounds(
                sigma, plan.sample_rate, rounds, plan.delta)))
        else:
            curves[name] = [(r, epsilon([*plan.prior, (sigma, plan.sample_rate,
                                                       r * plan.steps_per_round)],
                                        plan.delta, name)) for r in rounds]
    return curves


def sigma_for_targets(plan: Plan | UserPlan, targets: list[float], accountants=ACCOUNTANTS
                      ) -> dict[str, list[tuple[float, float]]]:
    """{accountant: [(target ε, σ), ...]}: the smallest noise multiplier (to 1e-3, relative)
    whose ε after the whole plan is ≤ each target, never one that passes it. A user-level
    plan's PLD column is pld_plan.calibrate (dp-accounting's PLD at its default
    discretisation); every other column common.privacy.accountants.calibrate_noise, as
    privet simulate calibrates. Raises ValueError for a target that no σ reaches or an
    unknown accountant name."""
    table = {}
    for name in accountants:
        if isinstance(plan, UserPlan) and name == "pld":
            table[name] = [(t, pld_plan.calibrate(t, plan.delta, plan.sample_rate,
                                                  plan.rounds)) for t in targets]
        else:
            table[name] = [(t, calibrate_noise(t, plan.delta, plan.sample_rate, plan.steps,
                                               name, prior=plan.prior)) for t in targets]
    return table


def _plot_per_accountant(series: dict[str, list[tuple[float, float]]], path: Path,
                         **axes) -> Path:
    """One line per accountant, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    ax.set(**axes)
    if "xticks" in axes:
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": SOFTWARE})
    plt.close(fig)
    return path


SOFTWARE = "privet budget"  # PNG metadata: the plots privet may write over


def written_by_privet(path: Path) -> bool:
    """True when `path` is a PNG this command wrote (its Software metadata says so)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get("Software") == SOFTWARE
    except OSError:
        return False


def plot_epsilon(curves: dict[str, list[tuple[int, float]]], sigma: float, path: Path) -> Path:
    return _plot_per_accountant(curves, path, xlabel="round", ylabel="ε",
                                title=f"ε spent over rounds (σ = {sigma:g})")


def plot_sigma(table: dict[str, list[tuple[float, float]]], path: Path) -> Path:
    targets = sorted({t for points in table.values() for t, _ in points})
    # a log axis labels its own ticks as 3×10⁰, 4×10⁰, which run together: the targets
    # themselves are the ticks, written plainly
    return _plot_per_accountant(table, path, xscale="log", xlabel="target ε",
                                ylabel="noise multiplier σ", xticks=targets,
                                xticklabels=[f"{t:g}" for t in targets],
                                title="Noise needed for the whole run")
