"""Coordinate-wise median of the updates (Yin et al., 2018, "Byzantine-Robust Distributed
Learning: Towards Optimal Statistical Rates", ICML). Flower's FedMedian does the maths."""

from flwr.serverapp.strategy import FedMedian

from privet.server.strategy import PrivetFedAvg


class PrivetFedMedian(PrivetFedAvg, FedMedian):
    """Robust to a minority of corrupted updates; with sample-level DP, post-processing.
    Refused with user-level DP (its sensitivity analysis assumes a sum)."""
