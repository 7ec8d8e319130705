"""A server optimizer stepped on the user-level DP aggregate: DP-FedAvg's clipped, noised mean
(McMahan et al., 2018, "Learning Differentially Private Recurrent Language Models") becomes
the pseudo-gradient of FedAvgM, FedAdam, FedYogi or FedAdagrad (Reddi et al., 2021,
"Adaptive Federated Optimization"; Hsu et al., 2019), as in DP-FedAdam.

Order matters. The optimizer here sees only the noised aggregate, so its moments and its
step are post-processing and the ε is DP-FedAvg's. Flower's own DP wrappers
(DifferentialPrivacyServerSideFixedClipping) add the noise after the inner strategy's
aggregation, i.e. after the server optimizer has stepped on the clean mean: its moments
would then hold un-noised information carried into later rounds.

The optimizer is Flower's own class, driven through its public methods: configure_train on a
grid of one node, then aggregate_train on that node's reply, whose weights are the DP
aggregate (an average of one is itself). Flower's classes keep their state their own way
(FedAvgM an ArrayRecord, FedOpt numpy arrays); this way privet reads none of it.
"""

from __future__ import annotations

import random

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

StateDict = dict[str, torch.Tensor]


class _OneNode:
    """The part of Flower's Grid that sampling reads, with one node: the DP aggregate."""

    def get_node_ids(self) -> list[int]:
        return [0]


def step_on_aggregate(optimizer, server_round: int, global_state: StateDict,
                      aggregate: StateDict) -> StateDict:
    """The new global weights: `optimizer` (a Flower FedAvg subclass with min_train_nodes and
    min_available_nodes 1) stepped from `global_state` towards `aggregate`, which it treats
    as the average of the round's updates (pseudo-gradient aggregate − global).
    Both map the same keys to tensors of the same shapes; the result does too (its dtype is
    what Flower's arithmetic gives). Flower's sampling draws from the global `random`, whose
    state is put back."""
    state = random.getstate()
    try:
        sent = list(optimizer.configure_train(server_round, ArrayRecord(global_state),
                                              ConfigRecord({}), _OneNode()))
    finally:
        random.setstate(state)
    reply = Message(RecordDict({"arrays": ArrayRecord(aggregate),
                                "metrics": MetricRecord({"num-examples": 1})}),
                    reply_to=sent[0])
    arrays, _ = optimizer.aggregate_train(server_round, [reply])
    return arrays.to_torch_state_dict()
