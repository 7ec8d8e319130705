"""Split a dataset's row indices over clients, deterministically from a seed.

Every client computes the same full split and keeps only its own part, so no
coordinator ever holds or ships an assignment of rows. Every scheme assigns every
row to exactly one client: a row that a scheme cannot place by its own rule goes to
a client anyway (each function says how), because a silently dropped row would
bias a comparison between schemes. Impossible requests raise ValueError naming the
config key to change.

Plain numpy rather than flwr-datasets' partitioners: those need Hugging Face `datasets`
and some drop rows (pathological when a class is drawn by no client, shard, size when
the sizes fall short of the dataset).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

KINDS = ("iid", "dirichlet", "shards", "quantity", "natural")
MISSING = "(missing)"


def _check_min_rows(num_rows: int, num_clients: int, min_rows: int) -> None:
    if num_clients * min_rows > num_rows:
        raise ValueError(f"data.min-rows = {min_rows}: {num_rows} rows cannot give "
                         f"{num_clients} clients {min_rows} rows each; lower data.min-rows "
                         f"or use fewer clients")


def iid(num_rows: int, num_clients: int, seed: int, min_rows: int = 1) -> list[np.ndarray]:
    """Uniformly shuffled, near-equal shares (sizes differ by at most one row)."""
    _check_min_rows(num_rows, num_clients, min_rows)  # iid's smallest is num_rows // num_clients
    order = np.random.default_rng(seed).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              min_rows: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
    """Label skew: each class is split over clients with proportions ~ Dir(alpha).

    Draws again (from the same seeded stream) until every client has at least
    `min_rows` rows, as in Hsu et al. (2019) and flwr-datasets' DirichletPartitioner.
    """
    if num_clients * min_rows > len(labels):
        raise ValueError(f"data.min-rows = {min_rows}: {len(labels)} rows cannot give "
                         f"{num_clients} clients {min_rows} rows each")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            rows = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for client, chunk in enumerate(np.split(rows, cuts)):
                parts[client].append(chunk)
        result = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in result) >= min_rows:
            return result
    raise ValueError(f"no Dirichlet(alpha={alpha}) split of {len(labels)} rows over "
                     f"{num_clients} clients gave every client {min_rows} rows in "
                     f"{max_tries} draws; raise alpha or lower data.min-rows")


def shards(labels: np.ndarray, num_clients: int, shards_per_client: int, seed: int,
           min_rows: int = 1) -> list[np.ndarray]:
    """Pathological label skew (McMahan et al., 2017): each client gets a few label shards.

    Rows are sorted by label (ties in seeded random order), cut into
    num_clients * shards_per_client contiguous shards and dealt out at random, so a
    client sees about `shards_per_client` classes. Shard sizes differ by at most one
    row: the n % shards leftover rows lengthen the first shards instead of being
    dropped. A shard that straddles a class boundary carries two classes.
    """
    num_shards = num_clients * shards_per_client
    n = len(labels)
    if shards_per_client < 1 or num_shards > n:
        raise ValueError(f"data.shards-per-client = {shards_per_client}: {num_clients} "
                         f"clients x {shards_per_client} shards needs at least {num_shards} "
                         f"rows, have {n}")
    smallest = shards_per_client * (n // num_shards)
    if smallest < min_rows:
        raise ValueError(f"data.min-rows = {min_rows}: shards of {n} rows give some of "
                         f"{num_clients} clients only {smallest} rows; lower data.min-rows "
                         f"or use fewer clients")
    rng = np.random.default_rng(seed)
    codes = np.unique(labels, return_inverse=True)[1].ravel()
    shuffled = rng.permutation(n)
    order = shuffled[np.argsort(codes[shuffled], kind="stable")]
    pieces = np.array_split(order, num_shards)
    dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
    return [np.sort(np.concatenate([pieces[s] for s in mine])) for mine in dealt]


def quantity_sizes(num_rows: int, num_clients: int, power: float,
                   min_rows: int = 1) -> np.ndarray:
    """Client sizes by rank (largest first): min_rows each, the rest ∝ rank^-power.

    Rounding leftovers go one row each to the largest fractional parts (ties to the
    better rank), so the sizes add up to num_rows exactly.
    """
    if power < 0:
        raise ValueError(f"data.power = {power}: must be ≥ 0")
    _check_min_rows(num_rows, num_clients, min_rows)
    rest = num_rows - num_clients * min_rows
    weights = np.arange(1, num_clients + 1, dtype=float) ** -power
    exact = weights / weights.sum() * rest
    sizes = np.floor(exact).astype(np.int64)
    leftover = rest - int(sizes.sum())
    sizes[np.argsort(-(exact - sizes), kind="stable")[:leftover]] += 1
    return sizes + min_rows


def quantity(num_rows: int, num_clients: int, power: float, seed: int,
             min_rows: int = 1) -> list[np.ndarray]:
    """Size skew: client shares follow a power law over ranks given out in seeded order.

    power = 0 gives equal shares; labels stay iid within each client.
    """
    sizes = quantity_sizes(num_rows, num_clients, power, min_rows)
    rng = np.random.default_rng(seed)
    rank_of_client = rng.permutation(num_clients)
    order = rng.permutation(num_rows)
    parts = np.split(order, np.cumsum(sizes[rank_of_client])[:-1])
    return [np.sort(p) for p in parts]


def _group_names(groups: np.ndarray | list) -> np.ndarray:
    """Values as stripped strings; None, NaN and blank cells become one "(missing)" group."""
    values = pd.Series(np.asarray(groups, dtype=object), dtype=object)
    names = values.astype(str).str.strip()
    return names.mask(values.isna() | names.eq(""), MISSING).to_numpy(dtype=object)


def _pack(names: np.ndarray, num_clients: int) -> list[list[str]]:
    """Greedy bin packing: values by count (desc, ties by name), each to the smallest client.

    With as many values as clients this is one value per client, ordered by count.
    """
    values, counts = np.unique(names.astype(str), return_counts=True)
    if len(values) < num_clients:
        raise ValueError(f"data.natural-column has only {len(values)} distinct values "
                         f"({', '.join(values[:10])}{', ...' if len(values) > 10 else ''}) "
                         f"for num-clients = {num_clients}: use at most {len(values)} "
                         f"clients or another column")
    bins: list[list[str]] = [[] for _ in range(num_clients)]
    totals = np.zeros(num_clients, dtype=np.int64)
    for i in sorted(range(len(values)), key=lambda i: (-counts[i], values[i])):
        target = int(np.argmin(totals))  # first of the smallest: deterministic
        bins[target].append(str(values[i]))
        totals[target] += counts[i]
    return bins


def natural_groups(groups: np.ndarray | list, num_clients: int) -> list[list[str]]:
    """Which values of the natural column each client holds (for reports)."""
    return _pack(_group_names(groups), num_clients)


def natural(groups: np.ndarray | list, num_clients: int, min_rows: int = 1) -> list[np.ndarray]:
    """Feature/ID skew: clients are the values of a column (e.g. country), grouped if too many.

    Needs no seed: the split is a function of the column alone. Missing values form
    their own "(missing)" group so those rows are placed too.
    """
    names = _group_names(groups)
    bins = _pack(names, num_clients)
    parts = [np.flatnonzero(np.isin(names, values)) for values in bins]
    for client, (values, rows) in enumerate(zip(bins, parts)):
        if len(rows) < min_rows:
            raise ValueError(f"data.min-rows = {min_rows}: natural client {client} "
                             f"({' + '.join(values)}) has only {len(rows)} rows; lower "
                             f"data.min-rows or use fewer clients")
    return parts


def partition(kind: str, labels: np.ndarray, num_clients: int, *, seed: int, min_rows: int,
              alpha: float = 0.5, shards_per_client: int = 2, power: float = 1.0,
              groups: np.ndarray | None = None) -> list[np.ndarray]:
    """One sorted int64 array of row indices per client; every row in exactly one."""
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients < 1:
        raise ValueError(f"num-clients = {num_clients}: must be ≥ 1")
    _check_min_rows(n, num_clients, min_rows)  # one message for every kind's first limit
    if kind == "iid":
        parts = iid(n, num_clients, seed, min_rows)
    elif kind == "dirichlet":
        parts = dirichlet(labels, num_clients, alpha, seed, min_rows)
    elif kind == "shards":
        parts = shards(labels, num_clients, shards_per_client, seed, min_rows)
    elif kind == "quantity":
        parts = quantity(n, num_clients, power, seed, min_rows)
    elif kind == "natural":
        if groups is None or len(groups) != n:
            raise ValueError(f"data.natural-column: natural partition needs the column's "
                             f"{n} values, got {'none' if groups is None else len(groups)}")
        parts = natural(groups, num_clients, min_rows)
    else:
        raise ValueError(f"data.partition = {kind!r}: unknown, expected one of {KINDS}")
    return [p.astype(np.int64, copy=False) for p in parts]
