"""Client sampling of PrivetFedAvg: clients-per-round of the connected nodes, fewer when
nodes disconnect (down to min-clients), never the ones left out for too little data."""

import random

import pytest
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from privet.server.strategy import PrivetFedAvg


@pytest.fixture(autouse=True)
def _task_identity():
    """Flower stamps messages with the run, task and node they come from."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


class ConnectedNodes:
    """Just the part of Flower's Grid that sampling reads: who is connected now."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return list(self.nodes)


def sampled(strategy, grid) -> list[int]:
    messages = strategy.configure_train(1, ArrayRecord(), ConfigRecord({}), grid)
    return sorted(m.metadata.dst_node_id for m in messages)


def strategy(num_clients: int, per_round: int, min_clients: int = 1) -> PrivetFedAvg:
    return PrivetFedAvg(fraction_train=per_round / num_clients, clients_per_round=per_round,
                        min_available_nodes=min_clients, fraction_evaluate=0.0)


def test_samples_exactly_clients_per_round_despite_float_rounding():
    random.seed(0)
    # 29 / 100 * 100 = 28.999999999999996: int() alone would sample 28
    assert len(sampled(strategy(100, 29), ConnectedNodes(range(100)))) == 29


def test_goes_on_with_the_nodes_that_remain():
    s = strategy(3, 3)
    assert sampled(s, ConnectedNodes([11, 12, 13])) == [11, 12, 13]
    assert sampled(s, ConnectedNodes([11, 13])) == [11, 13]  # node 12 disconnected


def test_never_samples_nodes_left_out():
    s = strategy(4, 4)
    s.left_out.add(12)
    assert sampled(s, ConnectedNodes([11, 12, 13, 14])) == [11, 13, 14]


class CountedNodes(ConnectedNodes):
    """Nodes that connect one per ask, counting the asks (Flower's get_node_ids walks every
    node: at 100,000 in-memory nodes ~0.4 s an ask)."""

    def __init__(self, nodes, connect_later=()):
        super().__init__(nodes)
        self.later, self.asks = list(connect_later), 0

    def get_node_ids(self):
        self.asks += 1
        if self.later:
            self.nodes.append(self.later.pop(0))
        return super().get_node_ids()


def test_a_round_asks_the_grid_once_for_its_nodes_when_enough_are_connected():
    grid = CountedNodes(range(1000))
    assert len(sampled(strategy(1000, 10), grid)) == 10
    assert grid.asks == 1


def test_a_round_asks_again_while_fewer_than_min_clients_are_connected():
    """Waiting for nodes to connect still sees them connect (Flower's sampling asks again)."""
    grid = CountedNodes([1], connect_later=[2, 3])
    assert sampled(strategy(3, 3, min_clients=3), grid) == [1, 2, 3]
    assert grid.asks == 2  # [1, 2] was too few: asked again
