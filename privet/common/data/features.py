"""What each input column of a tabular model is: the description a model factory may take.

A model factory is called as `factory(input_shape, num_outputs, train)`; one whose signature
also accepts the keyword `features` is given a `Features` as well (None for images), so a
model can treat a categorical column differently from a number, e.g. look it up in an
nn.Embedding. Factories without that keyword are called as before.

Design. The encoded rows already carry each categorical column as a one-hot block (the
schema's vocabulary, then `other`), so the description only says where each block lies and
what its columns mean; the model turns a block into an index itself (the position of its
1; an all-zero block, which feature selection can leave for values whose column it
dropped, is "none of these", a reserved last index). No second encoding of the rows, no
change to what clients compute, send or spend, and every model that reads one-hots keeps
working. The description is the *structure* of the transform, never its numbers (fills,
scales, PCA weights): column names, which are numbers, each categorical's block and values.
It is therefore the same on the server and on every client, because that structure is:

- `preprocess.fit = "federated"`: the shared transform (its `max-categories` vocabularies,
  its selected columns, its PCA), which the server fits from noised statistics and sends to
  every client; the description is read off it (`FittedTransform.features`);
- a local fit (each client its own, user-level DP or `fit = "local"`): the config refuses
  selection, PCA and max-categories there, so every client's columns are the schema's
  (numbers, then each vocabulary + `other`): `schema_features`. The schema is public (Adult's
  is built in; a deployed node's vocabularies must be declared), and a server that reads
  no rows (`evaluation.mode = "federated"`) gets it in the clients' description of their
  data, where they must all agree.

After PCA the inputs are components: every column is a number and there are no blocks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Sequence


@dataclass(frozen=True)
class Categorical:
    """One categorical column: its one-hot block is input columns [start, stop), one per
    value in `values` (in order; the last is usually `other`, which takes unseen values).

    A row has at most one 1 in the block; none when feature selection dropped its value's
    column. A model indexing an embedding uses `cardinality` = len(values) + 1 rows: one per
    column and a reserved last one for an all-zero block.
    """
    name: str
    start: int
    values: tuple[str, ...]

    @property
    def stop(self) -> int:
        return self.start + len(self.values)

    @property
    def cardinality(self) -> int:
        return len(self.values) + 1


@dataclass(frozen=True)
class Features:
    """The model's input columns, in order: `names` (one per column), `numeric` (positions
    of the columns that are scaled numbers, or PCA components) and `categorical` (each
    categorical column's one-hot block). Every column is in exactly one of them."""
    names: tuple[str, ...]
    numeric: tuple[int, ...]
    categorical: tuple[Categorical, ...]

    def __post_init__(self) -> None:
        covered = sorted([*self.numeric, *(i for c in self.categorical
                                            for i in range(c.start, c.stop))])
        if covered != list(range(len(self.names))):
            raise ValueError("Features: every input column must be either numeric or in "
                             "exactly one categorical block")

    def __len__(self) -> int:
        return len(self.names)

    def to_json(self) -> str:
        return json.dumps({"names": list(self.names), "numeric": list(self.numeric),
                           "categorical": [{"name": c.name, "start": c.start,
                                            "values": list(c.values)}
                                           for c in self.categorical]})

    @classmethod
    def from_json(cls, text: str) -> "Features":
        raw = json.loads(text)
        return cls(tuple(raw["names"]), tuple(int(i) for i in raw["numeric"]),
                   tuple(Categorical(c["name"], int(c["start"]), tuple(c["values"]))
                         for c in raw["categorical"]))


def layout(numeric: Sequence[str], categorical: Iterable[tuple[str, Sequence[str]]],
           other: str, keep: Sequence[int] | None = None, components: int = 0) -> Features:
    """The description of rows encoded as privet's transform encodes them: `numeric`
    columns, then per categorical column its vocabulary and `other`; then, where `keep`
    is given, only those encoded columns (in that order: sorted, as selection keeps them);
    after a projection onto `components` principal components, just those."""
    if components:
        return Features(tuple(f"pc{i + 1}" for i in range(components)),
                        tuple(range(components)), ())
    columns: list[tuple[str, str | None, str]] = [(n, None, n) for n in numeric]
    for name, vocabulary in categorical:
        columns += [(name, v, f"{name}={v}") for v in (*vocabulary, other)]
    if keep is not None:
        if list(keep) != sorted(set(keep)):
            raise ValueError("layout: kept columns must be increasing")
        columns = [columns[i] for i in keep]
    names = tuple(label for _, _, label in columns)
    numbers = tuple(i for i, (_, value, _) in enumerate(columns) if value is None)
    blocks: list[Categorical] = []
    for i, (name, value, _) in enumerate(columns):
        if value is None:
            continue
        if blocks and blocks[-1].name == name and blocks[-1].stop == i:
            blocks[-1] = Categorical(name, blocks[-1].start, (*blocks[-1].values, value))
        else:
            blocks.append(Categorical(name, i, (value,)))
    return Features(names, numbers, tuple(blocks))
