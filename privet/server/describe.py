"""What a server that holds no data learns about its clients before round 1.

With `evaluation.mode = "federated"` the server reads no rows: every client describes its
data (counts only) so the server can build the model and write the partition report. In a
deployment every node describes its own data whatever the evaluation mode: the partition
report is what the nodes hold (never a split of a dataset the server happens to have), and
two nodes with one partition-id are refused before any of them trains or releases anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from privet.common import records as R
from privet.common.data.features import Features
from privet.server.queries import QueryFailed, ask_every_client


@dataclass(frozen=True)
class Described:
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    report: list[dict]  # as common.data.datasets.partition_report writes it
    features: Features | None = None  # tables: what each column is (the schema's layout)


class DuplicatePartition(QueryFailed):
    """Two nodes answered with the same partition-id: one line naming it and both nodes."""


def check_unique(ids_by_node: dict[int, int]) -> None:
    """Raises DuplicatePartition when two nodes (node id -> partition-id) share a
    partition-id: they would share a client id and a privacy ledger's record."""
    first: dict[int, int] = {}
    for node, client in sorted(ids_by_node.items()):
        if client in first:
            raise DuplicatePartition(
                f"partition-id {client} is used by two nodes ({first[client]} and {node}); "
                "each node needs its own (0..num-clients-1): nothing was trained or released "
                "(restart one of them with another --partition-id)")
        first[client] = node


def describe_clients(grid: Grid) -> Described:
    """Every connected node's description of its own data (counts only, in the clear);
    raises DuplicatePartition before anything else when two nodes share a partition-id."""
    replies = ask_every_client(grid, ConfigRecord({}), "query.describe",
                               "describing the clients")
    check_unique({r.metadata.src_node_id: int(r.content["describe"][R.CLIENT_ID])
                  for r in replies})
    described = sorted((r.content["describe"] for r in replies),
                       key=lambda d: int(d[R.CLIENT_ID]))
    shapes = {tuple(int(v) for v in d["input-shape"]) for d in described}
    names = {tuple(str(c) for c in d["classes"]) for d in described}
    layouts = {str(d.get("features", "")) for d in described}
    if len(shapes) != 1 or len(names) != 1 or len(layouts) != 1:
        columns = "" if len(layouts) == 1 else " and different columns"
        raise QueryFailed(f"clients disagree on their data: example shapes {sorted(shapes)}, "
                           f"classes {sorted(names)}{columns}; every node needs the same "
                           "schema (data.categories, data.classes)")
    classes = next(iter(names))
    report = []
    for d in described:
        counts = [int(c) for c in d["label-counts"]]
        rows = int(d["rows"])
        row = {"client": int(d[R.CLIENT_ID]), "rows": rows}
        row.update({f"label={n}": c for n, c in zip(classes, counts)})
        row["majority-share"] = round(max(counts) / max(sum(counts), 1), 4)
        row["missing-cells"] = int(d["missing-cells"])
        report.append(row)
    layout = next(iter(layouts))
    return Described(next(iter(shapes)), classes, report,
                     Features.from_json(layout) if layout else None)


def check_node_ids(grid: Grid) -> None:
    """The connected nodes' partition-ids (a resumed run's nodes may have come back):
    raises DuplicatePartition when two share one, before anything is trained."""
    replies = ask_every_client(grid, ConfigRecord({}), "query.describe",
                               "asking the nodes for their partition-ids")
    check_unique({r.metadata.src_node_id: int(r.content["describe"][R.CLIENT_ID])
                  for r in replies})
