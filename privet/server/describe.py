"""What a server that holds no data learns about its clients before round 1.

With `evaluation.mode = "federated"` the server reads no rows: every client describes its
data (counts only) so the server can build the model and write the partition report.
"""

from __future__ import annotations

from dataclasses import dataclass

from flwr.app import ConfigRecord
from flwr.serverapp import Grid

from privet.common import records as R
from privet.common.data.features import Features
from privet.server.queries import ask_every_client


@dataclass(frozen=True)
class Described:
    input_shape: tuple[int, ...]
    classes: tuple[str, ...]
    report: list[dict]  # as common.data.datasets.partition_report writes it
    features: Features | None = None  # tables: what each column is (the schema's layout)


def describe_clients(grid: Grid) -> Described:
    replies = ask_every_client(grid, ConfigRecord({}), "query.describe",
                               "describing the clients")
    described = sorted((r.content["describe"] for r in replies),
                       key=lambda d: int(d[R.CLIENT_ID]))
    ids = [int(d[R.CLIENT_ID]) for d in described]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise RuntimeError(f"partition-id {repeated} is used by more than one node; each "
                           "node needs its own (0..num-clients-1): they would share a "
                           "privacy ledger and a client id")
    shapes = {tuple(int(v) for v in d["input-shape"]) for d in described}
    names = {tuple(str(c) for c in d["classes"]) for d in described}
    layouts = {str(d.get("features", "")) for d in described}
    if len(shapes) != 1 or len(names) != 1 or len(layouts) != 1:
        columns = "" if len(layouts) == 1 else " and different columns"
        raise RuntimeError(f"clients disagree on their data: example shapes {sorted(shapes)}, "
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
