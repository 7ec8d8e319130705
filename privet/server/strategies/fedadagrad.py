"""FedAdagrad: the average update used as a pseudo-gradient for a server-side Adagrad step (Reddi
et al., 2021, "Adaptive Federated Optimization", ICLR; arXiv:2003.00295). Flower's FedAdagrad
does the maths (server learning rate eta, betas, adaptivity tau); privet adds its recording
and sampling."""

from flwr.serverapp.strategy import FedAdagrad

from privet.server.strategy import PrivetFedAvg


class PrivetFedAdagrad(PrivetFedAvg, FedAdagrad):
    """A server optimizer over the clients' (sample-level private) updates: post-processing,
    so it spends no ε. Not combined with user-level DP, whose noise must come first."""
