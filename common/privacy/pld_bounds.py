"""dp-accounting's self-convolution bounds, remembering what does not change.

Each PLD ε query self-composes a client's one-step PLD `steps` times. dp-accounting first
bounds the result's support with Chernoff bounds, computing the log moment-generating
function of the one-step PMF at 40 orders (40 passes over ~5,000-10,000 points): two thirds
of a query, and the same numbers every round, since only `steps` changes. This keeps them per
PMF and redoes only the arithmetic that involves `steps`, the same operations in the same
order as dp_accounting.pld.common.compute_self_convolve_bounds (tests compare the two for
equality). A query drops from ~20 ms to ~7 ms.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
from dp_accounting.pld import common
from scipy import special

_original = common.compute_self_convolve_bounds
_MAX_KEPT = 256  # PMFs; a client has one or two, a calibration ~20 short-lived ones
_kept: dict[tuple[int, bytes], tuple[np.ndarray, list[float]]] = {}


def _log_mgfs(probs: np.ndarray) -> tuple[np.ndarray, list[float]]:
    key = (len(probs), hashlib.blake2b(probs.tobytes(), digest_size=16).digest())
    found = _kept.get(key)
    if found is None:
        # dp-accounting's default orders and its log-MGF expression, verbatim
        orders = np.concatenate((np.arange(-20, 0), np.arange(1, 21))) / len(probs)
        found = (orders, [special.logsumexp(np.arange(len(probs)) * order, b=probs)
                          for order in orders])
        if len(_kept) >= _MAX_KEPT:
            _kept.pop(next(iter(_kept)))
        _kept[key] = found
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


def install() -> None:
    """Make dp-accounting's self_convolve use these bounds (idempotent)."""
    common.compute_self_convolve_bounds = compute_self_convolve_bounds
