"""FedAvgM: FedAvg with server momentum (Hsu, Qi & Brown, 2019, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", arXiv:1909.06335).
Flower's FedAvgM does the maths; privet adds its recording and sampling."""

from flwr.serverapp.strategy import FedAvgM

from privet.server.strategy import PrivetFedAvg


class PrivetFedAvgM(PrivetFedAvg, FedAvgM):
    """The server keeps a momentum of the average update (server_learning_rate,
    server_momentum). A post-processing of the clients' (sample-level private) updates."""
