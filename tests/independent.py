"""ε computed with dp-accounting directly: the independent reference for privacy tests."""

import dp_accounting
from dp_accounting.pld import common, pld_pmf, pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant


def _event(history):
    return dp_accounting.ComposedDpEvent([
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)),
            int(steps))
        for sigma, q, steps in history])


def pld_epsilon(history, delta, discretisation=1e-4):
    """dp-accounting's PLD (default: at its default, finer discretisation), pessimistic; with
    dp-accounting's own code even where privet has sped it up (privet.patches.dp_accounting)."""
    patched = (common.compute_self_convolve_bounds, pld_pmf._get_epsilon_for_delta,
               pld_pmf._truncate_tails)
    common.compute_self_convolve_bounds = getattr(patched[0], "__wrapped__", patched[0])
    pld_pmf._get_epsilon_for_delta = getattr(patched[1], "__wrapped__", patched[1])
    pld_pmf._truncate_tails = getattr(patched[2], "__wrapped__", patched[2])
    try:
        accountant = pld_privacy_accountant.PLDAccountant(
            value_discretization_interval=discretisation)
        accountant.compose(_event(history))
        return accountant.get_epsilon(delta)
    finally:
        (common.compute_self_convolve_bounds, pld_pmf._get_epsilon_for_delta,
         pld_pmf._truncate_tails) = patched


def rdp_epsilon(history, delta):
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(_event(history))
    return accountant.get_epsilon(delta)
