"""From a config and a client id to that client's preprocessed arrays.

In simulation each client reads the shared file and keeps only its partition's rows;
everything after that (cleaning, imputing, encoding, scaling) is fitted on those rows.
Results are cached per process so a Ray actor does not redo them every round.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from common.config import ExperimentConfig
from common.data import adult
from common.data.partition import partition
from common.data.preprocess import CleaningReport, clean, make_transform


@dataclass(frozen=True)
class ClientData:
    features: np.ndarray  # float32, (rows, features)
    labels: np.ndarray    # int64 class indices
    cleaning: CleaningReport
    feature_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def encode_labels(values, classes: list[str], where: str) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    normalised = [adult.normalise_label(v) for v in values]
    unknown = sorted({v for v in normalised if v not in lookup})
    if unknown:
        raise ValueError(f"{where}: unknown label value(s) {unknown[:5]}; expected one of "
                         f"{classes}")
    return np.fromiter((lookup[v] for v in normalised), dtype=np.int64, count=len(normalised))


@functools.lru_cache(maxsize=8)
def _partitions(dataset: str, kind: str, num_clients: int, alpha: float, seed: int,
                min_rows: int) -> tuple[np.ndarray, ...]:
    raw = adult.load_raw("train")
    labels = np.array([adult.normalise_label(v) for v in raw[adult.LABEL]])
    return tuple(partition(kind, labels, num_clients, alpha=alpha, seed=seed,
                           min_rows=min_rows))


def _prepare(frame, *, drop_duplicates: bool, where: str) -> ClientData:
    cleaned, report = clean(frame, numeric=adult.NUMERIC, label=adult.LABEL,
                            missing_markers=adult.MISSING_MARKERS,
                            drop_duplicates=drop_duplicates)
    if len(cleaned) == 0:
        raise ValueError(f"{where}: no rows left after cleaning ({report.as_dict()})")
    labels = encode_labels(cleaned[adult.LABEL], adult.CLASSES, where)
    transform = make_transform(adult.NUMERIC, adult.CATEGORIES)
    features = transform.fit_transform(cleaned.drop(columns=[adult.LABEL]))
    return ClientData(features.astype(np.float32), labels, report,
                      tuple(transform.get_feature_names_out()))


@functools.lru_cache(maxsize=4)
def _client_data(dataset: str, kind: str, num_clients: int, alpha: float, seed: int,
                 min_rows: int, client_id: int) -> ClientData:
    rows = _partitions(dataset, kind, num_clients, alpha, seed, min_rows)[client_id]
    frame = adult.load_raw("train").iloc[rows]
    return _prepare(frame, drop_duplicates=True, where=f"{dataset} client {client_id}")


def client_data(cfg: ExperimentConfig, client_id: int) -> ClientData:
    """The client's own rows, cleaned and transformed with statistics of those rows only."""
    if not 0 <= client_id < cfg.num_clients:
        raise ValueError(f"client id {client_id} outside 0..{cfg.num_clients - 1}")
    d = cfg.data
    return _client_data(d.dataset, d.partition, cfg.num_clients, d.alpha, cfg.seed,
                        d.min_rows, client_id)


def client_sizes(cfg: ExperimentConfig) -> list[int]:
    """Raw rows per client (before cleaning); raises ValueError if the split is impossible."""
    d = cfg.data
    return [len(p) for p in _partitions(d.dataset, d.partition, cfg.num_clients, d.alpha,
                                        cfg.seed, d.min_rows)]


@functools.lru_cache(maxsize=2)
def test_data(dataset: str) -> ClientData:
    """The held-out test file, prepared like a client prepares its rows: fitted on itself.

    Duplicates are kept: the test set is measured as published.
    """
    return _prepare(adult.load_raw("test"), drop_duplicates=False, where=f"{dataset} test")


def num_features(dataset: str) -> int:
    return len(adult.NUMERIC) + sum(len(v) for v in adult.CATEGORIES.values())


def num_classes(dataset: str) -> int:
    return len(adult.CLASSES)
