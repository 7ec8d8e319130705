"""Trimmed mean: per coordinate, the mean of the updates after dropping the beta share of
the largest and of the smallest (Yin et al., 2018, "Byzantine-Robust Distributed Learning:
Towards Optimal Statistical Rates", ICML). Flower's FedTrimmedAvg does the maths."""

from flwr.serverapp.strategy import FedTrimmedAvg

from privet.server.strategy import PrivetFedAvg


class PrivetFedTrimmedAvg(PrivetFedAvg, FedTrimmedAvg):
    """Robust to a few corrupted updates; with sample-level DP, post-processing. Refused with
    user-level DP: its sensitivity analysis assumes a sum of clipped updates."""
