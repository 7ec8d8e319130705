"""FedAdam: the average update used as a pseudo-gradient for a server-side Adam step (Reddi
et al., 2021, "Adaptive Federated Optimization", ICLR; arXiv:2003.00295). Flower's FedAdam
does the maths (server learning rate eta, betas, adaptivity tau); privet adds its recording
and sampling."""

from flwr.serverapp.strategy import FedAdam

from privet.server.strategy import PrivetFedAvg


class PrivetFedAdam(PrivetFedAvg, FedAdam):
    """A server optimizer over the clients' (sample-level private) updates: post-processing,
    so it spends no ε. Not combined with user-level DP, whose noise must come first."""
