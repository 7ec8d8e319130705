"""(Multi-)Krum: keep the update(s) closest to their neighbours, assuming at most
`byzantine` corrupted ones (Blanchard et al., 2017, "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent", NeurIPS). Flower's MultiKrum does the maths; with
`multi` = 1 it is Krum."""

from flwr.serverapp.strategy import MultiKrum

from privet.server.strategy import PrivetFedAvg


class PrivetMultiKrum(PrivetFedAvg, MultiKrum):
    """Averages the `num_nodes_to_select` updates with the smallest Krum scores. With
    sample-level DP, post-processing; refused with user-level DP."""
