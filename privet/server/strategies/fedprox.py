"""FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, 2020, "Federated Optimization in
Heterogeneous Networks", MLSys; arXiv:1812.06127). Flower's FedProx sends the proximal
weight μ to the clients (config key "proximal-mu"); privet's clients add μ·(w − w_global) to
each DP-SGD step's noised gradient (privet.clients.sgd.add_proximal_term)."""

from flwr.serverapp.strategy import FedProx

from privet.server.strategy import PrivetFedAvg


class PrivetFedProx(PrivetFedAvg, FedProx):
    """FedAvg on the server; each client's local objective gains (μ/2)·‖w − w_global‖².
    The term depends on no example: it costs no ε at sample level, and at user level the
    server still clips and noises the updates it produces."""
