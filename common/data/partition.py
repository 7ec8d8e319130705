"""Split a dataset's row indices over clients, deterministically from a seed.

Every client computes the same full split and keeps only its own part, so no
coordinator ever holds or ships an assignment of rows.
"""

from __future__ import annotations

import numpy as np


def iid(num_rows: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """Uniformly shuffled, near-equal shares."""
    order = np.random.default_rng(seed).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
              min_rows: int = 1, max_tries: int = 1000) -> list[np.ndarray]:
    """Label skew: each class is split over clients with proportions ~ Dir(alpha).

    Draws again (from the same seeded stream) until every client has at least
    `min_rows` rows, as in Hsu et al. (2019) and flwr-datasets' DirichletPartitioner.
    """
    if num_clients * min_rows > len(labels):
        raise ValueError(f"{len(labels)} rows cannot give {num_clients} clients "
                         f"{min_rows} rows each")
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


def partition(kind: str, labels: np.ndarray, num_clients: int, *, alpha: float, seed: int,
              min_rows: int) -> list[np.ndarray]:
    if kind == "iid":
        return iid(len(labels), num_clients, seed)
    if kind == "dirichlet":
        return dirichlet(labels, num_clients, alpha, seed, min_rows)
    raise ValueError(f"unknown partition {kind!r}")
