"""Privacy planning without training: ε over rounds for a given σ, or σ for a target ε."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from privet.clients.train import sample_rate, steps_per_epoch
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
        return cls(rounds, local_epochs * steps_per_epoch(rows, batch_size),
                   sample_rate(rows, batch_size), delta, prior)

    @property
    def steps(self) -> int:
        return self.rounds * self.steps_per_round


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


def epsilon_over_rounds(plan: Plan, sigma: float, accountants=ACCOUNTANTS
                        ) -> dict[str, list[tuple[int, float]]]:
    return {name: [(r, epsilon([*plan.prior, (sigma, plan.sample_rate,
                                             r * plan.steps_per_round)], plan.delta, name))
                   for r in report_rounds(plan.rounds)]
            for name in accountants}


def sigma_for_targets(plan: Plan, targets: list[float], accountants=ACCOUNTANTS
                      ) -> dict[str, list[tuple[float, float]]]:
    return {name: [(t, calibrate_noise(t, plan.delta, plan.sample_rate, plan.steps, name,
                                       prior=plan.prior))
                   for t in targets] for name in accountants}


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
