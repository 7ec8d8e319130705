"""ε of composed subsampled Gaussian steps, and the noise that reaches a target ε.

Pure functions over a history `[(noise_multiplier, sample_rate, steps), ...]`, the
same shape Opacus' accountants keep. Three accountants, selectable by name:

- `pld`: dp-accounting's privacy-loss-distribution accountant (pessimistic
  discretisation, so the value is an upper bound); tight, the default.
- `prv`: Opacus' PRV accountant (upper estimate).
- `rdp`: Rényi DP via Opacus' analysis; looser but classic.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import math
import os
import warnings
from pathlib import Path

from privet.common.cache import cache_dir
from privet.common.opacus_import import imported, opacus

# dp-accounting (~0.8 s with scipy) and Opacus are imported on first use, under
# common.opacus_import's lock (two threads importing the same modules lazily at once, the
# ServerApp thread and a ClientApp loader, deadlocked): a run without DP never pays for them.


def _pld():
    """dp_accounting.pld.privacy_loss_distribution."""
    return imported("dp_accounting.pld.privacy_loss_distribution")


def _cache():
    """privet.patches.dp_accounting: the on-disk cache of one-step PLDs (off when stock)."""
    return imported("privet.patches.dp_accounting")
_DP_ACCOUNTING = importlib.metadata.version("dp-accounting")

ACCOUNTANTS = ("pld", "prv", "rdp")
# PLD grid step. 1e-3 is ~10x faster than dp-accounting's 1e-4 default and, being
# pessimistic, still an upper bound (measured: 3.8995 vs 3.8991 at q=0.02, σ=1, 1000 steps).
PLD_DISCRETISATION = 1e-3

History = tuple[tuple[float, float, int], ...]


def _pld_path(sigma: float, q: float) -> Path:
    key = f"{sigma!r}|{q!r}|{PLD_DISCRETISATION!r}|{_DP_ACCOUNTING}"
    name = hashlib.sha256(key.encode()).hexdigest()[:32]
    return _cache_file().parent / "pld" / f"{name}.npz"


@functools.lru_cache(maxsize=128)
def _subsampled_gaussian(sigma: float, q: float
                         ):  # -> dp_accounting's PrivacyLossDistribution
    """One step's PLD. Building it is most of a first query's cost (dp-accounting evaluates
    the privacy loss point by point in Python, ~26 ms), and a client asks about the same
    (σ, q) every round: kept per process, and read from the cache directory when another
    simulation worker (or an earlier run) left it there (see _pld_epsilon)."""
    found = _cache().load_pld(_pld_path(sigma, q))
    if found is not None:
        return found
    return _pld().from_gaussian_mechanism(
        standard_deviation=sigma, sampling_prob=q,
        value_discretization_interval=PLD_DISCRETISATION)


def _pld_epsilon(history: History, delta: float, on_disk: bool = False) -> float:
    """What dp-accounting's PLDAccountant computes for PoissonSampledDpEvent(q, Gaussian(σ))
    composed `steps` times per entry (tested equal), reusing each entry's one-step PLD. With
    `on_disk` (a ledger's query, not a calibration's ~20 passing σ) the one-step PLDs are
    also written to the cache directory."""
    composed = None
    for sigma, q, steps in history:
        if q == 0:
            continue
        one_step = _subsampled_gaussian(sigma, q)
        if on_disk and not (path := _pld_path(sigma, q)).exists():
            _cache().save_pld(path, one_step)
        entry = one_step.self_compose(int(steps))
        composed = entry if composed is None else composed.compose(entry)
    return 0.0 if composed is None else float(composed.get_epsilon_for_delta(delta))


def _prv_epsilon(history: History, delta: float) -> float:
    accountant = opacus("opacus.accountants").PRVAccountant()
    accountant.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(accountant.get_epsilon(delta))


def _rdp_epsilon(history: History, delta: float) -> float:
    orders = opacus("opacus.accountants.rdp").RDPAccountant.DEFAULT_ALPHAS
    analysis = opacus("opacus.accountants.analysis.rdp")
    rdp = sum(analysis.compute_rdp(q=q, noise_multiplier=s, steps=int(n), orders=orders)
              for s, q, n in history)
    with warnings.catch_warnings():
        # "Optimal order is the largest alpha": the bound is then loose, which the RDP
        # search in calibration expects (PLD/PRV refine it); not news for the user
        warnings.simplefilter("ignore", UserWarning)
        eps, _ = analysis.get_privacy_spent(orders=orders, rdp=rdp, delta=delta)
    return float(eps)


_EPSILON = {"pld": _pld_epsilon, "prv": _prv_epsilon, "rdp": _rdp_epsilon}


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(history: History, delta: float, accountant: str) -> float:
    if accountant == "pld":  # a ledger's (σ, q) recur: their one-step PLDs go to disk too
        return _pld_epsilon(history, delta, on_disk=True)
    return _EPSILON[accountant](history, delta)


def epsilon(history, delta: float, accountant: str = "pld") -> float:
    """ε at `delta` after composing every entry of `history`; 0 for an empty history."""
    if accountant not in _EPSILON:
        raise ValueError(f"accountant {accountant!r}: expected one of {ACCOUNTANTS}")
    steps = tuple((float(s), float(q), int(n)) for s, q, n in history if int(n) > 0)
    if not steps:
        return 0.0
    if any(s <= 0 for s, _, _ in steps):
        return math.inf
    return _epsilon_cached(steps, float(delta), accountant)


def _cache_file() -> Path:
    return cache_dir() / "noise-calibration.json"


def _read_cache() -> dict[str, float]:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, value: float) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache()
        entries[key] = value
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


def _bracket_with_rdp(target: float, delta: float, q: float, steps: int, prior: History = ()
                      ) -> float:
    """A σ whose RDP ε is ≤ target, within a factor 2 of the smallest such σ."""
    def spent(sigma: float) -> float:
        return _rdp_epsilon(prior + ((sigma, q, steps),), delta)

    sigma = 1.0
    if spent(sigma) > target:
        while spent(sigma) > target:
            sigma *= 2
            if sigma > 1e4:
                raise ValueError(f"no noise multiplier ≤ 1e4 reaches ε = {target} at δ = {delta}")
        return sigma
    while sigma > 1e-3 and spent(sigma / 2) <= target:
        sigma /= 2
    return sigma


@functools.lru_cache(maxsize=1024)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "pld", rtol: float = 1e-3, prior: History = ()
                    ) -> float:
    """Smallest noise multiplier (within `rtol`) whose ε after `steps` is ≤ the target.

    `prior` is spending that comes first (e.g. noised preprocessing statistics): the
    steps get what the target leaves. Bisection on σ, always returning the side that
    satisfies the target, so the planned run never overspends. Results are cached in
    memory and on disk.
    """
    if not target_epsilon > 0 or math.isinf(target_epsilon):
        raise ValueError(f"target ε {target_epsilon}: expected a finite value > 0")
    prior = tuple((float(s), float(q), int(n)) for s, q, n in prior)
    key = f"{accountant}|{target_epsilon!r}|{delta!r}|{sample_rate!r}|{int(steps)}|{rtol!r}"
    if prior:
        key += f"|{prior!r}"
        spent_before = epsilon(prior, delta, accountant)
        if spent_before >= target_epsilon:
            raise ValueError(f"the earlier spending already reaches ε = {spent_before:.4g} ≥ "
                             f"target {target_epsilon}; lower preprocess.epsilon")
    cached = _read_cache().get(key)
    if cached is not None:
        return float(cached)

    def spent(sigma: float) -> float:
        return _EPSILON[accountant](prior + ((sigma, sample_rate, int(steps)),), delta)

    high = _bracket_with_rdp(target_epsilon, delta, sample_rate, int(steps), prior)
    if accountant == "rdp":
        low = high / 2
    else:
        # RDP is a valid but looser bound: its σ meets the target under any accountant.
        # Step down from it; never probe far below, where PLD/PRV grids explode in size.
        low = high
        while spent(low) <= target_epsilon:
            high, low = low, low * 0.9
            if low < 1e-3:
                raise ValueError(f"noise below 1e-3 would do for ε = {target_epsilon}")
    while high - low > rtol * high:
        mid = (low + high) / 2
        if spent(mid) <= target_epsilon:
            high = mid
        else:
            low = mid
    _write_cache(key, high)
    return high


def calibrate_after(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str, priors, before: History = ()) -> float | None:
    """The σ for `steps` more steps at `sample_rate` that keeps every one of `priors` (the
    histories earlier spending left on different groups of rows or participants), each
    followed by `before`, within the target: the largest such σ over the groups. None when
    a group has no budget left for any noise level. Raises ValueError (see calibrate_noise)
    when `before` alone is too much: a config error, not earlier spending."""
    before = tuple(before)
    sigmas = []
    for prior in priors:
        prior = tuple(prior)
        if prior and epsilon(prior + before, delta, accountant) >= target_epsilon:
            return None
        try:
            sigmas.append(calibrate_noise(target_epsilon, delta, sample_rate, steps,
                                          accountant, prior=prior + before))
        except ValueError:
            if not prior:
                raise
            return None  # what earlier spending left is too little for any noise level
    return max(sigmas)
