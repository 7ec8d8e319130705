"""Windowed data sources for drift mode: each client's rows arrive in windows.

A source gives, for client c and window w, the rows that arrive then (`window`) and held-out
rows from the same distribution (`test_window`, the simulation's oracle: the server scores
the global model on them). Features are scaled to [0, 1] by ranges declared per source, never
fitted to rows, so a transform costs no budget and the monitoring histograms have fixed bins.

River's generators (Agrawal et al. 1993; SEA, Street & Kim 2001; rotating Hyperplane, Hulten
et al. 2001) give one stream per client from the seed; `ConceptDriftStream` switches concept
at a known position, abruptly (width 1) or gradually (a sigmoid over `width` windows).
River is an optional extra (`pip install 'privet[drift]'`): imported only here, on use.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from privet.common.config import ConfigError, ExperimentConfig

GENERATORS = ("agrawal", "sea", "hyperplane")
# Agrawal et al. (1993), as river generates them: uniform ranges; hvalue is
# (9 - zipcode)·100000·U(0.5, 1.5), at most 1.35 M
AGRAWAL_BOUNDS = {"salary": (20e3, 150e3), "commission": (0.0, 75e3), "age": (20.0, 80.0),
                  "elevel": (0.0, 4.0), "car": (1.0, 20.0), "zipcode": (0.0, 8.0),
                  "hvalue": (0.0, 1.35e6), "hyears": (1.0, 30.0), "loan": (0.0, 500e3)}
SEA_BOUNDS = {f"x{i}": (0.0, 10.0) for i in range(3)}  # river names them 0, 1, 2
HYPERPLANE_FEATURES = 10


@dataclass(frozen=True)
class Window:
    """Rows of one client in one window: `features` (n, d) float32 in [0, 1], `labels` (n,)
    int64 class indices."""
    features: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def model_input(features: np.ndarray) -> np.ndarray:
    """What the model is fed: features (n, d) in [0, 1] centred to [-1, 1] (plain SGD and
    ReLU units learn faster on centred inputs; the histograms keep the [0, 1] scale)."""
    return features * 2.0 - 1.0


def _river():
    try:
        from river.datasets import synth
    except ImportError:
        raise ConfigError("drift.source: river's generators need the drift extra: pip install "
                          "'privet[drift]' (river needs Python ≥ 3.11)") from None
    return synth


def _seed(*parts: int) -> int:
    """A 31-bit seed from `parts` (river seeds Python's `random` with it)."""
    text = "|".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=4).digest(), "little") >> 1


def num_windows(cfg: ExperimentConfig) -> int:
    """Windows a run of `cfg.rounds` rounds goes through (the last may be cut short)."""
    return -(-cfg.rounds // cfg.drift.rounds_per_window)


def window_of(cfg: ExperimentConfig, server_round: int) -> int:
    """The window (0-based) whose rows round `server_round` (1-based) uses."""
    return (server_round - 1) // cfg.drift.rounds_per_window


def first_round(cfg: ExperimentConfig, window: int) -> int:
    return window * cfg.drift.rounds_per_window + 1


def drift_window(cfg: ExperimentConfig) -> int | None:
    """The first drifted window, or None without a scheduled drift."""
    return window_of(cfg, cfg.drift.drift_round) if cfg.drift.drift_round else None


def drifted_clients(cfg: ExperimentConfig) -> tuple[int, ...]:
    """The clients the drift hits: all, or the first `drift.drift-clients` of a shuffle seeded
    by `seed` (so a run and its test both know them)."""
    k = cfg.drift.drift_clients
    if not k or k >= cfg.num_clients:
        return tuple(range(cfg.num_clients))
    order = np.random.default_rng(_seed(cfg.seed, 0xD41F)).permutation(cfg.num_clients)
    return tuple(sorted(int(c) for c in order[:k]))


def drift_known(cfg: ExperimentConfig) -> bool:
    """Whether the run knows where drift is (and is not): always for a generator or Adult,
    whose schedule privet sets; for a file, only where `drift.drift-round` says."""
    return cfg.drift.source in GENERATORS + ("adult",) or bool(cfg.drift.drift_round)


def true_drift_rounds(cfg: ExperimentConfig) -> list[int]:
    """Rounds at which a drift starts (the first round of the drifted window)."""
    w = drift_window(cfg)
    return [] if w is None or w >= num_windows(cfg) else [first_round(cfg, w)]


def feature_names(cfg: ExperimentConfig) -> tuple[str, ...]:
    source = cfg.drift.source
    if source == "agrawal":
        return tuple(AGRAWAL_BOUNDS)
    if source == "sea":
        return tuple(SEA_BOUNDS)
    if source == "hyperplane":
        return tuple(f"x{i}" for i in range(HYPERPLANE_FEATURES))
    from privet.common.drift import tables  # adult, csv, parquet

    return tables.feature_names(cfg)


def num_classes(cfg: ExperimentConfig) -> int:
    if cfg.drift.source in GENERATORS:
        return 2
    from privet.common.drift import tables

    return tables.num_classes(cfg)


def _generator(cfg: ExperimentConfig, concept: int, seed: int, key: str = "concept-before"):
    synth, d = _river(), cfg.drift
    if d.source == "agrawal":
        if concept > 9:
            raise ConfigError(f"drift.{key} = {concept}: Agrawal has classification "
                              "functions 0-9")
        return synth.Agrawal(classification_function=concept, seed=seed,
                             perturbation=d.label_noise)
    if d.source == "sea":
        if concept > 3:
            raise ConfigError(f"drift.{key} = {concept}: SEA has variants 0-3")
        return synth.SEA(variant=concept, noise=d.label_noise, seed=seed)
    # a rotating hyperplane's concept is its plane, drawn from the seed; `concept` picks it
    return synth.Hyperplane(seed=_seed(seed, concept), n_features=HYPERPLANE_FEATURES,
                            noise_percentage=d.label_noise)


def _scaled(cfg: ExperimentConfig, x: dict) -> list[float]:
    if cfg.drift.source == "agrawal":
        return [(float(x[k]) - lo) / (hi - lo) for k, (lo, hi) in AGRAWAL_BOUNDS.items()]
    if cfg.drift.source == "sea":
        return [float(x[i]) / 10.0 for i in range(3)]
    return [float(x[i]) for i in range(HYPERPLANE_FEATURES)]


class _Switch:
    """The rows of `before` up to `position`, then those of `after` (an abrupt drift)."""

    def __init__(self, before, after, position: int) -> None:
        self.before, self.after, self.position = before, after, position

    def take(self, n: int):
        head = list(self.before.take(min(n, self.position)))
        return head + list(self.after.take(n - len(head)))


@functools.lru_cache(maxsize=64)
def _client_stream(cfg: ExperimentConfig, client: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every row client `client` gets in the run (`split` "train") or its held-out rows
    ("test"), in arrival order: (features, labels)."""
    d = cfg.drift
    per = d.rows_per_window if split == "train" else d.test_rows
    total = per * num_windows(cfg)
    seed = _seed(cfg.seed, client, 0 if split == "train" else 1)
    before = _generator(cfg, d.concept_before, seed)
    w = drift_window(cfg)
    if w is None or client not in drifted_clients(cfg):
        stream = before
    else:
        after = _generator(cfg, d.concept_after, _seed(seed, 2), "concept-after")
        if d.width:  # river's sigmoid is centred on `position`: the drift starts at w
            width = d.width * per
            stream = _river().ConceptDriftStream(stream=before, drift_stream=after,
                                                 position=w * per + width // 2, width=width,
                                                 seed=_seed(seed, 3))
        else:  # abrupt: a plain switch (ConceptDriftStream's width 1 overflows math.exp
            # 178 rows from its position, river 0.26)
            stream = _Switch(before, after, w * per)
    rows = list(stream.take(total))
    features = np.asarray([_scaled(cfg, x) for x, _ in rows], dtype=np.float32)
    labels = np.asarray([int(y) for _, y in rows], dtype=np.int64)
    return np.clip(features, 0.0, 1.0), labels


def check(cfg: ExperimentConfig) -> None:
    """Raises ConfigError (one line) when the source cannot give rows as configured: river
    missing, a concept out of range, a file's problem. Cheap: a generator gives one row of
    each concept (a whole stream takes seconds)."""
    if cfg.drift.source in GENERATORS:
        for key in ("concept-before", "concept-after"):
            concept = getattr(cfg.drift, key.replace("-", "_"))
            next(iter(_generator(cfg, concept, 0, key).take(1)))
    else:
        window(cfg, 0, 0)


def window(cfg: ExperimentConfig, client: int, w: int, split: str = "train") -> Window:
    """Client `client`'s rows of window `w` (0-based): the rows that arrive then (`split`
    "train") or held-out rows of the same distribution ("test"). Raises ConfigError for a
    source that cannot be read (river missing, a data file's problem: one line)."""
    if cfg.drift.source not in GENERATORS:
        from privet.common.drift import tables

        return tables.window(cfg, client, w, split)
    features, labels = _client_stream(cfg, client, split)
    per = cfg.drift.rows_per_window if split == "train" else cfg.drift.test_rows
    return Window(features[w * per:(w + 1) * per], labels[w * per:(w + 1) * per])
