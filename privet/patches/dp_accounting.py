"""dp-accounting's private internals, patched: PLD queries made faster with the same results.

Written against dp-accounting 0.6 (`WRITTEN_FOR`); `install()` refuses another version.
Three hot spots of its PLD queries, and a cache of one-step PLDs that reads its PMFs' private
fields:

1. Self-convolution bounds. Each ε query self-composes a client's one-step PLD `steps`
   times. dp-accounting first bounds the result's support with Chernoff bounds, computing
   the log moment-generating function of the one-step PMF at 40 orders (40 passes over
   ~5,000-10,000 points): two thirds of a query, and the same numbers every round, since
   only `steps` changes. These are kept per PMF; only the arithmetic that involves `steps`
   is redone, the same operations in the same order as
   dp_accounting.pld.common.compute_self_convolve_bounds (tests compare the two for
   equality). A query drops from ~20 ms to ~7 ms.
2. ε for δ. dp_accounting.pld.pld_pmf._get_epsilon_for_delta walks the composed PMF point by
   point in Python (~15,000 points); this finds the same stopping point with cumulative
   sums (tests: equal to 1e-12).
3. Tail truncation. pld_pmf._truncate_tails, which every composition of two different PLDs
   calls (a client's preprocessing statistics, then its DP-SGD steps), sums the PMF from
   each end point by point in Python (~4 ms a composition); cumulative sums find the same
   cut, since both add the same numbers in the same order (tests: identical output).
4. `save_pld`/`load_pld`: a client's one-step PLD kept on disk for the other pool workers and
   later runs (privet.common.privacy.accountants); off, like the rest, on stock libraries.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import itertools
import math
from pathlib import Path

import numpy as np
from dp_accounting.pld import common, pld_pmf, privacy_loss_distribution
from scipy import special

from privet.common.cache import save_arrays
from privet.patches import WRITTEN_FOR as RELEASES
from privet.patches import PatchError, check_version

WRITTEN_FOR = RELEASES["dp-accounting"]
INSTALLED = False

_original = common.compute_self_convolve_bounds
_MAX_KEPT = 256  # PMFs; a client has one or two, a calibration ~20 short-lived ones
_kept: dict[tuple[int, bytes], tuple[np.ndarray, list[float]]] = {}


def _key(probs: np.ndarray) -> tuple[int, bytes]:
    return len(probs), hashlib.blake2b(probs.tobytes(), digest_size=16).digest()


def _remember(probs: np.ndarray, orders: np.ndarray, log_mgfs: list[float]) -> None:
    if len(_kept) >= _MAX_KEPT:
        _kept.pop(next(iter(_kept)))
    _kept[_key(probs)] = (orders, log_mgfs)


def _log_mgfs(probs: np.ndarray) -> tuple[np.ndarray, list[float]]:
    found = _kept.get(_key(probs))
    if found is None:
        # dp-accounting's default orders and its log-MGF expression, verbatim
        orders = np.concatenate((np.arange(-20, 0), np.arange(1, 21))) / len(probs)
        _remember(probs, orders, [special.logsumexp(np.arange(len(probs)) * order, b=probs)
                                  for order in orders])
        found = _kept[_key(probs)]
    return found


@functools.wraps(_original)
def compute_self_convolve_bounds(input_list, num_times: int, tail_mass_truncation: float = 0,
                                 orders=None) -> tuple[int, int]:
    if tail_mass_truncation == 0 or orders is not None:
        return _original(input_list, num_times, tail_mass_truncation, orders)
    probs = np.asarray(input_list)
    orders, log_mgfs = _log_mgfs(probs)
    upper_bound = (len(probs) - 1) * num_times
    lower_bound = 0
    for order, log_mgf_value in zip(orders, log_mgfs):
        bound = (num_times * log_mgf_value + math.log(2 / tail_mass_truncation)) / order
        if not math.isfinite(bound):
            continue
        if order > 0:
            upper_bound = min(upper_bound, math.ceil(bound))
        if order < 0:
            lower_bound = max(lower_bound, math.floor(bound))
    return lower_bound, upper_bound


_original_epsilon = pld_pmf._get_epsilon_for_delta


@functools.wraps(_original_epsilon)
def epsilon_for_delta(infinity_mass: float, reversed_losses, probs, delta: float) -> float:
    """The loop of pld_pmf._get_epsilon_for_delta over losses in descending order, at once:
    it stops before the first point whose loss is at most log((U - δ) / L), U and L being
    the upper and lower masses accumulated so far, or returns early where U reaches δ while
    L is still 0."""
    if infinity_mass > delta:
        return math.inf
    probs = np.asarray(probs, dtype=float)
    count = len(probs)
    losses = np.fromiter(itertools.islice(reversed_losses, count), float, count)
    # masses before point i (index i) and after the last one (index count), summed in order
    upper = np.cumsum(np.concatenate(([infinity_mass], probs)))
    lower = np.cumsum(np.concatenate(([0.0], np.exp(-losses) * probs)))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        stops = (upper[:-1] > delta) & (lower[:-1] > 0) & (
            np.log((upper[:-1] - delta) / lower[:-1]) >= losses)
    early = (upper[1:] >= delta) & (lower[1:] == 0)
    stop = int(np.argmax(stops)) if stops.any() else count
    if early.any() and int(np.argmax(early)) < stop:
        return max(0, float(losses[int(np.argmax(early))]))
    mass_upper, mass_lower = float(upper[stop]), float(lower[stop])
    if mass_upper <= mass_lower + delta:
        return 0
    return math.log((mass_upper - delta) / mass_lower)


_original_truncate = pld_pmf._truncate_tails


def _prefix_within(values: np.ndarray, threshold: float) -> int:
    """Length of the longest prefix whose running sum stays ≤ threshold (the running sum of
    the Python loop it replaces: np.cumsum adds in the same order)."""
    over = np.cumsum(values) > threshold
    return int(np.argmax(over)) if over.any() else len(values)


@functools.wraps(_original_truncate)
def truncate_tails(probs, tail_mass_truncation: float, pessimistic_estimate: bool):
    """pld_pmf._truncate_tails with its two prefix loops as cumulative sums; the rest is
    dp-accounting's, verbatim."""
    if tail_mass_truncation == 0:
        return 0, probs, 0
    values = np.asarray(probs)
    left_idx = _prefix_within(values, tail_mass_truncation / 2)
    right_idx = len(values) - _prefix_within(values[::-1], tail_mass_truncation / 2)
    right_idx = max(right_idx, left_idx + 1)
    left_mass = np.sum(probs[:left_idx])
    right_mass = np.sum(probs[right_idx:])
    truncated_probs = probs[left_idx:right_idx]
    if pessimistic_estimate:
        truncated_probs[0] += left_mass
        return left_idx, truncated_probs, right_mass
    truncated_probs[-1] += right_mass
    return left_idx, truncated_probs, 0


def install() -> None:
    """Make dp-accounting use these (idempotent). Raises privet.patches.PatchError for a
    dp-accounting version they were not written for, or whose functions moved."""
    global INSTALLED
    if INSTALLED:
        return
    check_version("dp-accounting", importlib.metadata.version("dp-accounting"), WRITTEN_FOR)
    for module, name in ((common, "compute_self_convolve_bounds"),
                         (pld_pmf, "_get_epsilon_for_delta"), (pld_pmf, "_truncate_tails")):
        if not callable(getattr(module, name, None)):
            raise PatchError(f"dp-accounting has no {module.__name__}.{name}: update "
                             "privet/patches/dp_accounting.py for this version")
    common.compute_self_convolve_bounds = compute_self_convolve_bounds
    pld_pmf._get_epsilon_for_delta = epsilon_for_delta
    pld_pmf._truncate_tails = truncate_tails
    INSTALLED = True


def save_pld(path: Path, pld: privacy_loss_distribution.PrivacyLossDistribution) -> None:
    """A one-step PLD and its PMFs' Chernoff log-MGFs, as arrays (no pickle), atomically;
    a cache that cannot be written only costs time. Only dense PMFs: dp-accounting keeps
    small ones sparse, and those are cheap to build again. Nothing on stock libraries."""
    if not INSTALLED or not all(isinstance(pmf, pld_pmf.DensePLDPmf)
                                for pmf in (pld._pmf_remove, pld._pmf_add)):
        return
    arrays = {}
    for side, pmf in (("remove", pld._pmf_remove), ("add", pld._pmf_add)):
        orders, log_mgfs = _log_mgfs(np.asarray(pmf._probs))
        arrays.update({f"{side}_probs": pmf._probs, f"{side}_orders": orders,
                       f"{side}_log_mgfs": np.asarray(log_mgfs, dtype=float),
                       f"{side}_scalars": np.array([pmf._discretization, pmf._lower_loss,
                                                    pmf._infinity_mass])})
    save_arrays(path, arrays)


def load_pld(path: Path) -> privacy_loss_distribution.PrivacyLossDistribution | None:
    """What save_pld wrote (None if absent or unreadable, or on stock libraries); its
    log-MGFs are remembered."""
    if not INSTALLED:
        return None
    try:
        with np.load(path) as data:
            pmfs = []
            for side in ("remove", "add"):
                probs = data[f"{side}_probs"]
                discretization, lower_loss, infinity_mass = data[f"{side}_scalars"]
                pmfs.append(pld_pmf.DensePLDPmf(float(discretization), int(lower_loss), probs,
                                                float(infinity_mass), True))
                _remember(probs, data[f"{side}_orders"],
                          [float(v) for v in data[f"{side}_log_mgfs"]])
    except (OSError, KeyError, ValueError):
        return None
    return privacy_loss_distribution.PrivacyLossDistribution(pmfs[0], pmfs[1])


if globals().get("INSTALL_WHEN_LOADED"):  # privet.patches.install() ran before this import
    install()
