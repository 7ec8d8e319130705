"""FedAvg (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data") with two additions that privet needs and Flower's FedAvg lacks:

- every reply is shown to an observer before aggregation (per-client metrics and
  privacy ledgers are recorded, not just their average);
- replies from clients that declined to train (privacy budget spent) are left out of
  the average instead of failing the round;
- a client whose data is too small to train on says so once and is left out of
  sampling from then on; so is a client that failed (its reply names the reason) or
  whose update is not finite (rejected here, whatever the client says, and marked failed
  so that the run's records name it).
"""

from __future__ import annotations

import logging
import random
from typing import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result

from privet.common import records as R

log = logging.getLogger("flwr")

# (round, replies, node each message was sent to by message id): error replies made by the
# SuperLink for a lost node carry the SuperLink as sender, so the reply alone cannot say who.
ReplyObserver = Callable[[int, list[Message], dict[str, int]], None]
EvaluationObserver = Callable[[int, list[Message]], None]


def average_metrics(contents: list[RecordDict], weighting_key: str,
                    keys: tuple[str, ...] = R.AVERAGED) -> MetricRecord:
    """Example-weighted mean of the averaged metrics; per-client facts are not averaged."""
    metrics = [next(iter(c.metric_records.values())) for c in contents]
    total = sum(float(m[weighting_key]) for m in metrics)
    if total <= 0:
        return MetricRecord({})
    return MetricRecord({key: sum(float(m[key]) * float(m[weighting_key]) for m in metrics)
                         / total for key in keys if all(key in m for m in metrics)})


def average_evaluations(contents: list[RecordDict], weighting_key: str) -> MetricRecord:
    return average_metrics(contents, weighting_key, (R.EVAL_LOSS, R.EVAL_ACCURACY))


class _Reachable:
    """The grid as sampling sees it in one round: without the nodes that were left out.

    The connected nodes are asked once a round (with 100,000 in-memory nodes, each ask
    walks all of them: ~0.4 s), and again only while fewer than `enough` remain, as when
    Flower's sampling waits for nodes to connect."""

    def __init__(self, grid: Grid, left_out: set[int], enough: int) -> None:
        self._grid, self._left_out, self._enough = grid, left_out, enough
        self.connected = list(grid.get_node_ids())

    def get_node_ids(self) -> list[int]:
        ids = sorted(n for n in self.connected if n not in self._left_out)
        if len(ids) < self._enough:
            self.connected = list(self._grid.get_node_ids())
            ids = sorted(n for n in self.connected if n not in self._left_out)
        return ids

    def __getattr__(self, name: str):
        return getattr(self._grid, name)


class NoClientsLeft(Exception):
    """Too few clients remain to train once the failed and too-small ones are left out."""


UNIFORM_WEIGHT = "uniform-weight"  # metric the server sets on every reply it aggregates
NON_FINITE = "non-finite update: NaN or infinite weights (rejected by the server)"


def non_finite(message: Message) -> bool:
    """True for a training reply whose weights are not all finite."""
    if message.has_error() or "arrays" not in message.content:
        return False
    return any(not np.isfinite(array.numpy()).all()
               for array in message.content["arrays"].values())


def mark_failed(message: Message, reason: str) -> None:
    """Turn a reply into a failure the recorder and sampling treat as such."""
    metrics = message.content["metrics"]
    metrics[R.FAILED], metrics[R.DECLINED] = 1, 1
    message.content[R.FAILURE] = ConfigRecord({"reason": reason})


def _reply_order(message: Message) -> tuple[int, int]:
    if message.has_error() or "metrics" not in message.content:
        return (1, message.metadata.src_node_id)
    return (0, int(message.content["metrics"].get(R.CLIENT_ID, 0)))


class PrivetFedAvg(FedAvg):
    def __init__(self, *, on_train_replies: ReplyObserver | None = None,
                 on_evaluate_replies: EvaluationObserver | None = None,
                 clients_per_round: int | None = None, seed: int = 0,
                 weighting: str = "examples", **kwargs) -> None:
        """`weighting`: "examples" (FedAvg's: by each client's example count) or "uniform"
        (every client that trained counts once, as DP-FedAvg's average does)."""
        kwargs.setdefault("train_metrics_aggr_fn", average_metrics)
        kwargs.setdefault("evaluate_metrics_aggr_fn", average_evaluations)
        if weighting == "uniform":
            kwargs["weighted_by_key"] = UNIFORM_WEIGHT
        elif weighting != "examples":
            raise ValueError(f"weighting = {weighting!r}: expected 'examples' or 'uniform'")
        super().__init__(**kwargs)
        self.on_train_replies = on_train_replies
        self.on_evaluate_replies = on_evaluate_replies
        self.clients_per_round = clients_per_round
        self.seed = seed
        self.left_out: set[int] = set()  # node ids whose data is too small to train on
        self._sent: list[Message] = []
        # the latest federated evaluation: clients' held-out rows, example-weighted
        self.last_evaluation: MetricRecord = MetricRecord({})

    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
              *, first_round: int = 1, stop: Callable[[int], bool] | None = None) -> Result:
        """Flower's `Strategy.start` loop (train, federated evaluation, the server's
        evaluation per round), from round `first_round` on: a resumed run passes the round
        after its checkpoint and the model of that checkpoint as `initial_arrays` (the
        evaluation of round 0 is then not repeated). `stop(round)`, asked after each round's
        evaluation, ends the loop early when it returns True (a paused run)."""
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result, arrays = Result(), initial_arrays
        if evaluate_fn is not None and first_round == 1:
            found = evaluate_fn(0, arrays)
            if found is not None:
                result.evaluate_metrics_serverapp[0] = found
        for current in range(first_round, num_rounds + 1):
            log.info("[ROUND %s/%s]", current, num_rounds)
            replies = grid.send_and_receive(
                self.configure_train(current, arrays, train_config, grid), timeout=timeout)
            new_arrays, train_metrics = self.aggregate_train(current, replies)
            if new_arrays is not None:
                result.arrays = arrays = new_arrays
            if train_metrics is not None:
                result.train_metrics_clientapp[current] = train_metrics
            replies = grid.send_and_receive(
                self.configure_evaluate(current, arrays, evaluate_config, grid),
                timeout=timeout)
            evaluated = self.aggregate_evaluate(current, replies)
            if evaluated is not None:
                result.evaluate_metrics_clientapp[current] = evaluated
            if evaluate_fn is not None:
                found = evaluate_fn(current, arrays)
                if found is not None:
                    result.evaluate_metrics_serverapp[current] = found
            if stop is not None and current < num_rounds and stop(current):
                break
        return result

    def reachable(self, grid: Grid) -> Grid:
        """The grid without the left-out nodes; raises NoClientsLeft when leaving them out is
        what keeps a round from having min-clients (waiting would never end)."""
        view = _Reachable(grid, self.left_out, self.min_available_nodes)
        if (len(view.get_node_ids()) < self.min_available_nodes
                and len(view.connected) >= self.min_available_nodes):
            raise NoClientsLeft(
                f"{len(self.left_out)} of {len(view.connected)} clients failed or are too small "
                f"and are left out: fewer than min-clients = {self.min_available_nodes} "
                "remain to train")
        return view  # type: ignore[return-value]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Sample clients-per-round of the nodes that are connected and not left out; with
        fewer connected, all of them, as long as min-clients (min_available_nodes) remain,
        else wait for that many."""
        view = self.reachable(grid)
        available = len(view.get_node_ids())
        if self.clients_per_round is not None:
            self.min_train_nodes = min(self.clients_per_round,
                                       max(available, self.min_available_nodes))
        # Flower samples with the global `random`: seed it for this round (and put its state
        # back), so that the same seed and nodes give the same clients every run
        state = random.getstate()
        random.seed(f"privet|{self.seed}|{server_round}")
        try:
            return self.remember(super().configure_train(server_round, arrays, config, view))
        finally:
            random.setstate(state)

    def remember(self, messages: Iterable[Message]) -> list[Message]:
        """Keep this round's outgoing messages: the grid stamps their ids as it sends them."""
        self._sent = list(messages)
        return self._sent

    def observe_replies(self, server_round: int, replies: Iterable[Message]) -> list[Message]:
        """Show every reply to the observer; return all but those of declining clients, in
        client order: the weighted sums then do not depend on which client finished first
        (float addition is not associative), so the same seed gives the same model."""
        replies = sorted(replies, key=_reply_order)
        for message in replies:
            if non_finite(message):
                mark_failed(message, NON_FINITE)
        if self.on_train_replies is not None:
            sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._sent}
            self.on_train_replies(server_round, replies, sent_to)
        self.left_out.update(m.metadata.src_node_id for m in replies if not m.has_error()
                             and (int(m.content["metrics"].get(R.TOO_SMALL, 0))
                                  or int(m.content["metrics"].get(R.FAILED, 0))))
        kept = [m for m in replies
                if m.has_error() or not int(m.content["metrics"].get(R.DECLINED, 0))]
        for m in kept:  # the server's own weight, never a client's word
            if not m.has_error():
                m.content["metrics"][UNIFORM_WEIGHT] = 1
        return kept

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        return super().aggregate_train(server_round, self.observe_replies(server_round, replies))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        replies = list(replies)
        if self.on_evaluate_replies is not None:
            self.on_evaluate_replies(server_round, replies)
        # held-out scores average over rows, by examples, however the updates are weighted
        weighting, self.weighted_by_key = self.weighted_by_key, R.NUM_EXAMPLES
        try:
            metrics = super().aggregate_evaluate(server_round, replies)
        finally:
            self.weighted_by_key = weighting
        self.last_evaluation = metrics if metrics is not None else MetricRecord({})
        return metrics
