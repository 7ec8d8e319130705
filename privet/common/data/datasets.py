"""From a config and a client id to that client's preprocessed arrays.

A dataset is a *source*: the rows clients split among themselves, the server's test
rows, and (for tables) a schema every client knows without seeing rows. A source is a
table (adult, csv, parquet, a user's loader returning a DataFrame: privet's tabular
pipeline) or arrays used as they are (digits, fashion-mnist, image-folder, a loader's
arrays); `DataConfig.tabular` says which, and nothing else here asks. In simulation
each client reads the source and keeps only its partition's rows; everything after
that (cleaning, imputing, encoding, scaling) is fitted on those rows, or applied from a
transform fitted federatedly. Results are cached per process, so a Ray actor does not
redo them every round.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from privet.common.config import SHIPPED_DATASETS, DataConfig, ExperimentConfig, shaped
from privet.common.data import adult, images, loader, tables
from privet.common.data.partition import natural_groups, partition
from privet.common.data.numbers import PLAIN, NumberFormat
from privet.common.data.features import Features, layout
from privet.common.data.preprocess import (OTHER, CleaningReport, FittedTransform, Schema,
                                           clean, fit_local, schema_features)
from privet.common.data.target import parse_target, partition_bins, target_scale
from privet.common.privacy.ledger import array_digests, row_digests

log = logging.getLogger("flwr")


@dataclass(frozen=True)
class ClientData:
    features: np.ndarray  # float32, (rows, *example shape)
    labels: np.ndarray    # int64 class indices; regression: float32 targets scaled to [-1, 1]
    cleaning: CleaningReport
    feature_names: tuple[str, ...]
    feature_spec: Features | None = None  # what each column is (tables; common.data.features)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class TabularSource:
    """Raw string cells, exactly as read; cleaning is each client's own job."""
    train: pd.DataFrame            # the rows clients partition
    test: pd.DataFrame             # the server's held-out rows
    schema: Schema
    where: str                     # the file(s), for messages
    files: tuple[pd.DataFrame, ...] = ()  # folder mode: one frame per client
    warnings: tuple[str, ...] = ()  # skipped lines, non-numeric cells: shown to the user
    # with a held-out test share: each file whole, and the positions in it of the rows kept
    # (in `train` order); what a row's ledger digest is computed over
    origins: tuple[pd.DataFrame, ...] = ()
    kept: tuple[np.ndarray, ...] = ()


@dataclass(frozen=True)
class ImageSource:
    """Arrays used as they are: images, or a user's loader's arrays."""
    train: images.ImageSplit
    test: images.ImageSplit
    warnings: tuple[str, ...] = ()  # files passed over: shown to the user


def normalise_labels(values) -> list[str]:
    """Labels as class inference reads them (tables.normalise_label): trimmed, without
    trailing dots (Adult's test file writes ">50K."), numbers written one way."""
    return [tables.normalise_label(v) for v in values]


def encode_labels(values, classes, where: str) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(classes)}
    normalised = normalise_labels(values)
    unknown = sorted({v for v in normalised if v not in lookup})
    if unknown:
        raise ValueError(f"{where}: unknown label value(s) {unknown[:5]}; expected one of "
                         f"{list(classes)}")
    return np.fromiter((lookup[v] for v in normalised), dtype=np.int64, count=len(normalised))


def missing_markers(cfg: ExperimentConfig) -> tuple[str, ...]:
    return tuple(shaped(cfg.preprocess.missing_markers, []))


def declared_format(data: DataConfig) -> NumberFormat | None:
    """The number format data.decimal / data.thousands declare, or None (found per column)."""
    if not data.decimal and not data.thousands:
        return None
    decimal = data.decimal or ("," if data.thousands == "." else ".")
    thousands = "" if data.thousands in ("", "none") else data.thousands
    if decimal == thousands:
        raise ValueError(f"data.decimal = {decimal!r} and data.thousands = {thousands!r}: "
                         "expected different marks")
    return NumberFormat(decimal, thousands)


def _bounds(data: DataConfig, defaults: dict, numeric: Sequence[str], label: str = ""
            ) -> dict[str, tuple[float, float]]:
    """data.bounds over `defaults`; raises ValueError (one line, naming the column) for a
    pair that is not [low, high] with finite low < high, or a column that is not numeric."""
    bounds = dict(defaults)
    for column, pair in shaped(data.bounds, {}).items():
        if column == label:
            raise ValueError(f"data.bounds: {column!r} is the label (data.label); a "
                             "regression label's public range is data.label-bounds")
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(v, (int, float)) for v in pair)
                or not all(map(math.isfinite, pair)) or not pair[0] < pair[1]):
            raise ValueError(f"data.bounds: {column} = {pair!r}: expected [low, high] with "
                             "finite low < high")
        if column not in numeric:
            raise ValueError(f"data.bounds: {column!r} is not a numeric column of the data; "
                             f"numeric columns: {', '.join(numeric) or 'none'}")
        bounds[column] = (float(pair[0]), float(pair[1]))
    return bounds


def _holdout(frame: pd.DataFrame, fraction: float, seed: int
             ) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """(kept, held out, positions of the kept rows): a seeded share of the rows for the
    server's test set."""
    order = np.random.default_rng(seed).permutation(len(frame))
    cut = int(round(len(frame) * fraction))
    kept = np.sort(order[cut:])
    return (frame.iloc[kept].reset_index(drop=True),
            frame.iloc[np.sort(order[:cut])].reset_index(drop=True), kept)


def _adult_schema(data: DataConfig, task: str) -> Schema:
    """Adult's published schema; for regression `data.label` (a numeric column) is the label
    and income a categorical feature."""
    if task != "regression":
        return Schema(tuple(adult.NUMERIC), {c: tuple(v) for c, v in adult.CATEGORIES.items()},
                      adult.LABEL, tuple(adult.CLASSES),
                      _bounds(data, adult.BOUNDS, adult.NUMERIC))
    label = data.label
    numeric = tuple(c for c in adult.NUMERIC if c != label)
    categories = {**{c: tuple(v) for c, v in adult.CATEGORIES.items()},
                  adult.LABEL: tuple(adult.CLASSES)}
    defaults = {c: b for c, b in adult.BOUNDS.items() if c != label}
    return Schema(numeric, categories, label, (), _bounds(data, defaults, numeric, label),
                  task=task)


@functools.lru_cache(maxsize=4)
def tabular_source(data: DataConfig, seed: int, markers: tuple[str, ...],
                   task: str = "classification") -> TabularSource:
    """The rows clients split, the server's test rows and the schema (`task`: the label is
    a class, or a number for "regression")."""
    if data.dataset == "adult":
        schema = _adult_schema(data, task)
        test = adult.load_raw("test")
        if task == "regression":  # income is a feature: its test spelling (">50K.") as train's
            test = test.assign(**{adult.LABEL: normalise_labels(test[adult.LABEL])})
        return TabularSource(adult.load_raw("train"), test, schema,
                             str(adult.data_file("train")))
    path = Path(data.path).expanduser()
    if data.loader:  # a user's loader returned DataFrames: read them as a CSV file is read
        loaded = loader.load(data)
        found = [tables.from_frame(loaded.train_frame, label=data.label,
                                   where=f"{data.dataset} (data.dataset)")]
        test_tables = ([tables.from_frame(loaded.test_frame, label=data.label,
                                          where=f"{data.dataset} (data.dataset, test)")]
                       if loaded.test_frame is not None else [])
    else:
        found = (tables.read_folder(path, label=data.label, bad_lines=data.bad_lines)
                 if path.is_dir() else
                 [tables.read_table(path, label=data.label, bad_lines=data.bad_lines)])
        test_tables = ([tables.read_table(data.test_path, label=data.label,
                                          bad_lines=data.bad_lines)] if data.test_path else [])
    inferred = tables.infer_schema(
        found + test_tables, label=data.label, column_types=shaped(data.column_types, {}),
        categories=shaped(data.categories, {}), classes=shaped(data.classes, []),
        missing_markers=list(markers), number_format=declared_format(data),
        regression=task == "regression")
    schema = Schema(tuple(inferred.numeric), dict(inferred.categories), inferred.label,
                    tuple(inferred.classes), _bounds(data, {}, inferred.numeric, data.label),
                    dict(inferred.formats), task)
    columns = [*schema.numeric, *schema.categories, schema.label]
    warnings = inferred.fallbacks + _file_warnings(found + test_tables, schema, markers)
    frames = [t.frame[columns] for t in found]
    origins, kept = (), ()
    if test_tables:
        test = test_tables[0].frame[columns]
    else:
        split = [_holdout(f, data.test_fraction, seed + i) for i, f in enumerate(frames)]
        origins, kept = tuple(frames), tuple(k for _, _, k in split)
        frames, test = [k for k, _, _ in split], pd.concat([h for _, h, _ in split],
                                                            ignore_index=True)
    where = f"{data.dataset} (data.dataset)" if data.loader else str(path)
    train = frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)
    return TabularSource(train, test, schema, where,
                         files=tuple(frames) if len(frames) > 1 else (), warnings=warnings,
                         origins=origins, kept=kept)


def _file_warnings(found: list[tables.RawTable], schema: Schema,
                   markers: tuple[str, ...]) -> tuple[str, ...]:
    """What reading and cleaning will do to the files. Returned, not logged: the CLI prints
    them once before the run and the run's summary keeps them (every process that reads the
    files computes them again); a deployed node logs its own (node_source)."""
    out = []
    for table in found:
        if table.skipped_lines:
            shown = ", ".join(map(str, table.skipped_lines[:5]))
            out.append(f"{table.path.name}: skipped {len(table.skipped_lines)} line(s) with the "
                       f"wrong number of fields (data.bad-lines = \"skip\"): {shown}"
                       + (" …" if len(table.skipped_lines) > 5 else ""))
        bad = tables.describe_bad_numbers(
            table, tables.check_numeric(table, schema.numeric, list(markers), schema.formats))
        out += [line for line in bad.splitlines() if line]
    return tuple(out)


def source_warnings(cfg: ExperimentConfig) -> tuple[str, ...]:
    if not cfg.data.tabular:
        return image_source(cfg.data, cfg.seed).warnings
    return _source(cfg).warnings


@functools.lru_cache(maxsize=2)
def node_source(data: DataConfig, data_path: str, markers: tuple[str, ...],
                task: str = "classification") -> TabularSource:
    """A deployed node's own file: all its rows are its partition.

    Nodes never see each other's files, so they can only agree on the feature columns if
    the schema does not depend on the rows: Adult's is built in; for csv/parquet (and a
    loader's DataFrame: the loader is called with data.path = data_path) the vocabulary
    of every categorical column and (classification) the classes must be declared.
    """
    if not data.tabular:
        raise ValueError(f"node data-path = {data_path}: own files are read for tabular "
                         f"datasets; {data.dataset!r} is not one")
    regression = task == "regression"
    label = data.label if data.dataset != "adult" or regression else adult.LABEL
    if data.loader:
        table = tables.from_frame(loader.load_node(data, data_path).train_frame, label=label,
                                  where=f"{data.dataset} (data.dataset, data-path {data_path})")
    else:
        table = tables.read_table(data_path, label=label, bad_lines=data.bad_lines)
    fallbacks: tuple[str, ...] = ()
    if data.dataset == "adult":
        schema = tabular_source(data, 0, markers, task).schema
    else:
        declared, classes = shaped(data.categories, {}), shaped(data.classes, [])
        inferred = tables.infer_schema(
            [table], label=label, column_types=shaped(data.column_types, {}),
            categories=declared, classes=classes, missing_markers=list(markers),
            number_format=declared_format(data), regression=regression)
        undeclared = [c for c in inferred.categories if c not in declared]
        if undeclared or not (classes or regression):
            raise ValueError(
                f"{data_path}: each node reads only its own file, so the features must not "
                f"depend on its rows: declare "
                + ("data.categories" if regression else "data.classes and data.categories")
                + f" for {undeclared or 'every categorical column'}")
        schema = Schema(tuple(inferred.numeric), dict(inferred.categories), label,
                        () if regression else tuple(classes),
                        _bounds(data, {}, inferred.numeric, label if regression else ""),
                        dict(inferred.formats), task)
        fallbacks = inferred.fallbacks
    columns = [*schema.numeric, *schema.categories, schema.label]
    absent = [c for c in columns if c not in table.frame.columns]
    if absent:
        raise ValueError(f"{data_path}: column(s) {absent} missing; expected {columns}")
    frame = table.frame[columns]
    warnings = fallbacks + _file_warnings([table], schema, markers)
    for line in warnings:  # the node's own console: once per process (this is cached)
        log.warning("privet: %s", line)
    return TabularSource(frame, frame.iloc[:0], schema, data_path, warnings=warnings)


def _source(cfg: ExperimentConfig, data_path: str = "") -> TabularSource:
    if data_path:
        return node_source(cfg.data, data_path, missing_markers(cfg), cfg.train.task)
    return tabular_source(cfg.data, cfg.seed, missing_markers(cfg), cfg.train.task)


@functools.lru_cache(maxsize=2)
def image_source(data: DataConfig, seed: int) -> ImageSource:
    """The arrays of a dataset that is not tabular: shipped images, an image folder, or a
    loader's arrays; without a test split of its own, `data.test-fraction` is held out."""
    if data.dataset == "digits":
        return ImageSource(images.load_digits("train", seed=seed, test_fraction=data.test_fraction),
                           images.load_digits("test", seed=seed, test_fraction=data.test_fraction))
    if data.dataset == "image-folder":
        train, warnings = images.load_image_folder(
            data.path, size=data.image_size, channels=data.image_channels,
            classes=tuple(shaped(data.classes, [])))
        if data.test_path:
            test, more = images.load_image_folder(
                data.test_path, size=data.image_size, channels=data.image_channels,
                classes=train.classes)
            return ImageSource(train, test, warnings + more)
        return ImageSource(*images.hold_out(train, data.test_fraction, seed), warnings)
    if data.loader:
        loaded = loader.load(data)
        if loaded.test is not None:
            return ImageSource(loaded.train, loaded.test)
        return ImageSource(*images.hold_out(loaded.train, data.test_fraction, seed))
    return ImageSource(images.load_fashion_mnist("train", path=data.path, download=data.download),
                       images.load_fashion_mnist("test", path=data.path, download=data.download))


@functools.lru_cache(maxsize=2)
def node_arrays(data: DataConfig, data_path: str) -> images.ImageSplit:
    """A deployed node's own examples (all of them are its partition): the image folder
    `data_path` names, or what the loader returns when called with data.path = data_path.
    Nodes agree on the classes only if they do not depend on what each holds: declare
    `data.classes` (an image folder's subfolders must be among them)."""
    if data.dataset == "image-folder":
        split, warnings = images.load_image_folder(
            data_path, size=data.image_size, channels=data.image_channels,
            classes=tuple(shaped(data.classes, [])))
        for line in warnings:  # the node's own console: once per process (this is cached)
            log.warning("privet: %s", line)
        return split
    if data.loader:
        return loader.load_node(data, data_path).train
    raise ValueError(f"node data-path = {data_path}: own files are read for tabular "
                     f"datasets, image-folder and loaders; {data.dataset!r} is not one")


def _own_arrays(cfg: ExperimentConfig, client_id: int, data_path: str
                ) -> tuple[images.ImageSplit, np.ndarray]:
    """A client's arrays and which of them are its rows: a deployed node's own (image
    folder, loader), else its partition of the shared source (a shipped image dataset
    reads its partition even where the node names a data-path, as it always has)."""
    split = _own_split(cfg, data_path)
    if data_path and cfg.data.dataset not in SHIPPED_DATASETS:
        return split, np.arange(len(split))
    return split, partitions(cfg)[client_id]


def _own_split(cfg: ExperimentConfig, data_path: str) -> images.ImageSplit:
    if data_path and cfg.data.dataset not in SHIPPED_DATASETS:
        return node_arrays(cfg.data, data_path)
    return image_source(cfg.data, cfg.seed).train


def _train_labels_and_groups(cfg: ExperimentConfig) -> tuple[np.ndarray, np.ndarray | None]:
    if not cfg.data.tabular:
        split = image_source(cfg.data, cfg.seed).train
        return split.labels, None
    source = _source(cfg)
    if source.schema.regression:  # label skew over a number: over its quantile bins
        labels = partition_bins(_train_targets(cfg))
    else:
        labels = np.array(normalise_labels(source.train[source.schema.label]))
    groups = None
    if cfg.data.partition == "natural":
        column = cfg.data.natural_column
        if column not in source.train.columns:
            raise ValueError(f"data.natural-column = {column!r}: no such column in "
                             f"{source.where}; columns are {', '.join(source.train.columns)}")
        values = source.train[column].astype(str).str.strip()
        missing = values.isin(set(missing_markers(cfg)) | {""})
        groups = values.where(~missing, None).to_numpy(dtype=object)
    return labels, groups


def _train_targets(cfg: ExperimentConfig) -> np.ndarray:
    """A regression source's training labels as numbers, float64 (rows,); NaN where missing
    (those rows are dropped in cleaning, whichever client holds them)."""
    source = _source(cfg)
    table = source.schema
    values = source.train[table.label].astype("string").str.strip()
    missing = values.isin(set(missing_markers(cfg)) | {""}) | values.isna()
    targets = np.full(len(values), np.nan)
    present = ~missing.to_numpy(dtype=bool)
    targets[present] = parse_target(values[present], f"{source.where} (training rows)",
                                    table.label, table.formats.get(table.label, PLAIN))
    return targets


@functools.lru_cache(maxsize=8)
def _partitions(cfg: ExperimentConfig) -> tuple[np.ndarray, ...]:
    d = cfg.data
    if d.tabular:
        source = _source(cfg)
        if source.files:  # one file per client: the files are the partition
            if len(source.files) != cfg.num_clients:
                raise ValueError(f"data.path = {d.path}: {len(source.files)} files for "
                                 f"num-clients = {cfg.num_clients}; expected one per client")
            sizes = np.cumsum([0] + [len(f) for f in source.files])
            return tuple(np.arange(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
    labels, groups = _train_labels_and_groups(cfg)
    return tuple(partition(d.partition, labels, cfg.num_clients, seed=cfg.seed,
                           min_rows=d.min_rows, alpha=d.alpha,
                           shards_per_client=d.shards_per_client, power=d.power,
                           groups=groups))


def _partition_key(cfg: ExperimentConfig) -> ExperimentConfig:
    """Only what decides the split: a cache key shared by runs that differ elsewhere."""
    return replace(cfg, name="", rounds=1, clients_per_round=1, min_clients=1, out_dir="",
                   train=type(cfg.train)(task=cfg.train.task), privacy=type(cfg.privacy)(),
                   strategy=type(cfg.strategy)(),
                   preprocess=replace(type(cfg.preprocess)(),
                                      missing_markers=cfg.preprocess.missing_markers))


def partitions(cfg: ExperimentConfig) -> tuple[np.ndarray, ...]:
    return _partitions(_partition_key(cfg))


def client_rows(cfg: ExperimentConfig, client_id: int) -> pd.DataFrame:
    """The client's raw rows (tabular datasets, simulation)."""
    source = _source(cfg)
    return source.train.iloc[partitions(cfg)[client_id]]


def clean_rows(cfg: ExperimentConfig, frame: pd.DataFrame, where: str, *,
               drop_duplicates: bool, data_path: str = ""
               ) -> tuple[pd.DataFrame, np.ndarray, CleaningReport]:
    table = _source(cfg, data_path).schema
    cleaned, report = clean(frame, numeric=list(table.numeric), label=table.label,
                            missing_markers=list(missing_markers(cfg)),
                            drop_duplicates=drop_duplicates, formats=table.formats)
    if data_path and report.unparseable_numbers + report.non_finite_numbers:
        # a deployed node's own console (a simulation names the cells before the run)
        log.warning("%s: %d non-numeric and %d non-finite value(s) in numeric columns, treated "
                    "as missing", where, report.unparseable_numbers, report.non_finite_numbers)
    if len(cleaned) == 0:
        raise ValueError(f"{where}: no rows left after cleaning ({report.as_dict()})")
    if table.regression:  # float64 numbers in the label's units (scaled when encoded)
        labels = parse_target(cleaned[table.label], where, table.label,
                              table.formats.get(table.label, PLAIN))
    else:
        labels = encode_labels(cleaned[table.label], table.classes, where)
    return cleaned, labels, report


def holdout_mask(cfg: ExperimentConfig, client_id: int, rows: int) -> np.ndarray:
    """Federated evaluation: which of a client's rows are held out (fixed by the seed).

    Without federated evaluation nothing is held out: the server has its own test set."""
    mask = np.zeros(rows, dtype=bool)
    if cfg.evaluation.mode != "federated" or rows < 2:
        return mask
    count = min(max(1, round(rows * cfg.evaluation.holdout)), rows - 1)
    rng = np.random.default_rng([cfg.seed, client_id, 0x401D])
    mask[rng.permutation(rows)[:count]] = True
    return mask


# A simulation worker serves many clients in turn: keeping the partitions it has built
# (each is one client's rows) spares re-cleaning and re-encoding one whenever its client is
# sampled again, which cost more than its training on the default experiment. 64 keeps every
# partition of a federation of up to 64 clients; beyond, the least recently used go, so a
# thousand clients do not make a worker's memory grow round after round.
PARTITIONS_KEPT = 64


@functools.lru_cache(maxsize=PARTITIONS_KEPT)
def _cleaned_all(cfg: ExperimentConfig, client_id: int, data_path: str
                 ) -> tuple[pd.DataFrame, np.ndarray, CleaningReport]:
    if data_path:
        return clean_rows(cfg, node_source(cfg.data, data_path, missing_markers(cfg),
                                           cfg.train.task).train,
                          data_path, drop_duplicates=cfg.preprocess.drop_duplicates,
                          data_path=data_path)
    where = f"{cfg.data.dataset} client {client_id}"
    return clean_rows(cfg, client_rows(cfg, client_id), where,
                      drop_duplicates=cfg.preprocess.drop_duplicates)


def cleaned_client(cfg: ExperimentConfig, client_id: int, data_path: str = "", *,
                   held_out: bool = False
                   ) -> tuple[pd.DataFrame, np.ndarray, CleaningReport]:
    """The client's rows after cleaning: its partition in simulation, or, when the node
    names its own file (`data-path`), that file's rows. With federated evaluation, the
    training share (or, `held_out=True`, the share kept for evaluation); the cleaning
    report always covers all of them."""
    cleaned, labels, report = _cleaned_all(cfg, client_id, data_path)
    keep = holdout_mask(cfg, client_id, len(cleaned)) == held_out
    if keep.all():
        return cleaned, labels, report
    return cleaned[keep].reset_index(drop=True), labels[keep], report


@functools.lru_cache(maxsize=PARTITIONS_KEPT)
def _client_data(cfg: ExperimentConfig, client_id: int, transform_json: str,
                 data_path: str, held_out: bool = False) -> ClientData:
    if not cfg.data.tabular:
        split, rows = _own_arrays(cfg, client_id, data_path)
        n = len(rows)
        rows = rows[holdout_mask(cfg, client_id, n) == held_out]
        return ClientData(split.images[rows], split.labels[rows],
                          CleaningReport(n, 0, 0, 0, 0, 0, n), ())
    cleaned, labels, report = cleaned_client(cfg, client_id, data_path, held_out=held_out)
    transform = client_transform(cfg, client_id, transform_json, data_path)
    scale = target_scale(cfg)
    if scale is not None:  # a client's own labels: clipped to the public range, scaled
        labels = scale.encode(labels, clip=True)
    return ClientData(transform.apply(cleaned), labels, report,
                      tuple(transform.feature_names()), transform.features())


def client_holdout(cfg: ExperimentConfig, client_id: int, transform_json: str = "",
                   data_path: str = "") -> ClientData:
    """Federated evaluation: the client's held-out rows, encoded as its training rows are."""
    if cfg.evaluation.mode != "federated":
        raise ValueError("client_holdout: evaluation.mode is not \"federated\"")
    return _client_data(cfg, client_id, transform_json, data_path, True)


def client_transform(cfg: ExperimentConfig, client_id: int, transform_json: str = "",
                     data_path: str = "") -> FittedTransform | None:
    """The transform client `client_id` applies (None for images): the shared one, or the
    one it fits on its own training rows (held-out rows stay unseen). Also lets an auditor
    encode other rows exactly as the client did."""
    if not cfg.data.tabular:
        return None
    if transform_json:
        return FittedTransform.from_json(transform_json)
    own, _, _ = cleaned_client(cfg, client_id, data_path)
    return fit_local(own, _source(cfg, data_path).schema, cfg.preprocess)


def source_name(cfg: ExperimentConfig, data_path: str = "") -> str:
    """The data a client's rows come from, for ledgers and messages."""
    if data_path:
        return str(Path(data_path).expanduser().resolve())
    if cfg.data.dataset in ("csv", "parquet", "image-folder"):
        return str(Path(cfg.data.path).expanduser().resolve())
    if cfg.data.loader:  # the loader, and what it was given to read
        return cfg.data.dataset + (f" ({Path(cfg.data.path).expanduser().resolve()})"
                                   if cfg.data.path else "")
    return f"{cfg.data.dataset} (shipped)" if cfg.data.dataset == "adult" else cfg.data.dataset


def _canonical_numbers(text: pd.Series, fmt: NumberFormat) -> pd.Series:
    """A numeric column's cells as numbers written one way ("39.0", "39" and, in a file of
    decimal commas, "39,0" are "39"); cells that are not finite numbers stay as written."""
    values = fmt.parse(text).to_numpy(dtype=float)
    out = text.to_numpy(dtype=object).copy()
    for i in np.flatnonzero(np.isfinite(values)):
        value = values[i]
        out[i] = str(int(value)) if value.is_integer() else repr(float(value))
    return pd.Series(out, index=text.index)


def digest_columns(cfg: ExperimentConfig, data_path: str = "") -> tuple[str, ...]:
    """The columns a row's ledger digest is computed from (sorted; () for arrays)."""
    if not cfg.data.tabular:
        return ()
    table = _source(cfg, data_path).schema
    return tuple(sorted((*table.numeric, *table.categories, table.label)))


def _frame_digests(frame: pd.DataFrame, table: Schema) -> np.ndarray:
    """Ledger digests of a frame's rows, from each row's cells in canonical form, so that a
    row is the same row however its file is laid out or its numbers written: the schema's
    columns by name in sorted order (column order and extra columns do not matter), numbers
    as numbers ("39.0" is "39"), text trimmed, the label as class inference reads it."""
    columns = sorted(c for c in (*table.numeric, *table.categories, table.label)
                     if c in frame.columns)
    cells = []
    for column in columns:
        text = frame[column].astype(str).str.strip()
        if column in table.numeric or (column == table.label and table.regression):
            text = _canonical_numbers(text, table.formats.get(column, PLAIN))
        elif column == table.label:
            text = pd.Series(normalise_labels(text), index=text.index)
        cells.append((column + "=" + text).tolist())
    return row_digests(zip(*cells)) if cells else row_digests([] for _ in range(len(frame)))


@functools.lru_cache(maxsize=2)
def _train_digests(data: DataConfig, seed: int, markers: tuple[str, ...],
                   task: str = "classification") -> np.ndarray:
    """One ledger digest per row of the source's `train`, computed over each whole file (so
    a row keeps its digest whatever share is held out and whatever is appended after it)."""
    source = tabular_source(data, seed, markers, task)
    if source.origins:
        return np.concatenate([_frame_digests(whole, source.schema)[kept]
                               for whole, kept in zip(source.origins, source.kept)])
    return np.concatenate([_frame_digests(f, source.schema)
                           for f in source.files or (source.train,)])


@functools.lru_cache(maxsize=PARTITIONS_KEPT)
def client_digests(cfg: ExperimentConfig, client_id: int, data_path: str = "") -> np.ndarray:
    """The ledger digests of every raw row the client holds, sorted (`ledger.row_digests`: a
    row's trimmed cells and which copy of them it is in its file; images: their bytes and
    label). Its spend follows the rows whatever the split, the seed or the client's id."""
    if not cfg.data.tabular and (not data_path or cfg.data.dataset not in SHIPPED_DATASETS):
        split, rows = _own_arrays(cfg, client_id, data_path)
        return np.unique(array_digests(split.images, split.labels)[rows])
    if data_path:
        node = node_source(cfg.data, data_path, missing_markers(cfg), cfg.train.task)
        return np.unique(_frame_digests(node.train, node.schema))
    rows = partitions(cfg)[client_id]
    return np.unique(_train_digests(cfg.data, cfg.seed, missing_markers(cfg),
                                    cfg.train.task)[rows])


def _cleaned_test(cfg: ExperimentConfig) -> tuple[pd.DataFrame, np.ndarray, CleaningReport]:
    # duplicates kept: the test set is measured as published
    return clean_rows(cfg, _source(cfg).test, f"{cfg.data.dataset} test", drop_duplicates=False)


def test_rows(cfg: ExperimentConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """The server's held-out rows, cleaned but not transformed (tabular datasets); labels as
    `clean_rows` gives them (regression: float64 in the label's units)."""
    cleaned, labels, _ = _cleaned_test(cfg)
    return cleaned, labels


def client_data(cfg: ExperimentConfig, client_id: int, transform_json: str = "",
                data_path: str = "") -> ClientData:
    """The client's own rows, cleaned and transformed: with a transform fitted on those rows
    only, or with the shared one the server sent (`preprocess.fit = "federated"`)."""
    if not 0 <= client_id < cfg.num_clients:
        raise ValueError(f"client id {client_id} outside 0..{cfg.num_clients - 1}")
    return _client_data(cfg, client_id, transform_json, data_path)


@functools.lru_cache(maxsize=2)
def test_data(cfg: ExperimentConfig, transform_json: str = "") -> ClientData:
    """The server's held-out rows. With a shared transform, transformed by it; otherwise
    fitted on themselves, as a client fits its rows. Regression: labels scaled by the public
    range but not clipped to it (scores measure the real values)."""
    if not cfg.data.tabular:
        split = image_source(cfg.data, cfg.seed).test
        n = len(split.labels)
        # a writable copy: the cached arrays are read-only, and torch warns on those
        return ClientData(np.array(split.images), np.array(split.labels),
                          CleaningReport(n, 0, 0, 0, 0, 0, n), ())
    cleaned, labels, report = _cleaned_test(cfg)
    transform = (FittedTransform.from_json(transform_json) if transform_json
                 else fit_local(cleaned, _source(cfg).schema, cfg.preprocess))
    scale = target_scale(cfg)
    if scale is not None:
        labels = scale.encode(labels, clip=False)
    return ClientData(transform.apply(cleaned), labels, report,
                      tuple(transform.feature_names()), transform.features())


def model_input_shape(cfg: ExperimentConfig) -> tuple[int, ...]:
    """One example's shape as the model will see it, known before any row is read where the
    schema is declared: (channels, height, width) for images; (features,) for tables, where
    `select = "variance"` keeps an unknown number (the encoded width is given then)."""
    if not cfg.data.tabular:
        return tuple(image_source(cfg.data, cfg.seed).test.images.shape[1:])
    pre = cfg.preprocess
    if pre.pca:
        return (pre.pca,)
    width = encoded_width(_source(cfg).schema)
    return (min(pre.top_k, width),) if pre.select == "mutual-info" else (width,)


def planned_features(cfg: ExperimentConfig) -> Features | None:
    """The feature description as far as it is known before the fit, for checking the
    model before a run (the run itself gives the factory the fitted transform's): None for
    images, and where feature selection decides the columns; after PCA, only components;
    with max-categories, each block as wide as it will be (which values it keeps is left
    to the fit)."""
    if not cfg.data.tabular or cfg.preprocess.select != "none":
        return None
    pre, table = cfg.preprocess, _source(cfg).schema
    if pre.pca:
        return layout((), (), OTHER, components=pre.pca)
    if pre.max_categories:
        table = replace(table, categories={c: v[:pre.max_categories]
                                           for c, v in table.categories.items()})
    return schema_features(table)


def feature_description(cfg: ExperimentConfig, data_path: str = "") -> Features | None:
    """What each column of a locally fitted client's rows is, from the schema alone (no
    rows): what a client tells a server that reads no rows (None for images)."""
    if not cfg.data.tabular:
        return None
    return schema_features(_source(cfg, data_path).schema)


def encoded_width(table: Schema) -> int:
    """Features a row has after encoding, before selection and PCA: one per numeric column,
    and per categorical column one per vocabulary value plus `other`."""
    return len(table.numeric) + sum(len(v) + 1 for v in table.categories.values())


def classes(cfg: ExperimentConfig, data_path: str = "") -> tuple[str, ...]:
    """The class names, in the order of the model's outputs."""
    if not cfg.data.tabular:
        return _own_split(cfg, data_path).classes
    return _source(cfg, data_path).schema.classes


def num_classes(cfg: ExperimentConfig, data_path: str = "") -> int:
    return len(classes(cfg, data_path))


def num_outputs(cfg: ExperimentConfig, data_path: str = "") -> int:
    """The model's outputs: one per class, or 1 for regression (the scaled target)."""
    return 1 if cfg.regression else num_classes(cfg, data_path)


def schema(cfg: ExperimentConfig, data_path: str = "") -> Schema:
    return _source(cfg, data_path).schema


def client_sizes(cfg: ExperimentConfig) -> list[int]:
    """Raw rows per client (before cleaning); raises ValueError if the split is impossible."""
    return [len(p) for p in partitions(cfg)]


def partition_report(cfg: ExperimentConfig) -> list[dict]:
    """Per client: rows, rows per class, missing cells, from the raw partition; regression:
    rows, the label's mean and standard deviation (its units; missing labels left out) and
    missing cells. Simulation only: one person holds every row (this is not sent)."""
    if cfg.regression:
        return _regression_report(cfg)
    names = classes(cfg)
    report = []
    if not cfg.data.tabular:
        labels = image_source(cfg.data, cfg.seed).train.labels
        for client, rows in enumerate(partitions(cfg)):
            counts = np.bincount(labels[rows], minlength=len(names))
            report.append(_report_row(client, len(rows), counts, names, 0))
        return report
    source = _source(cfg)
    markers = set(missing_markers(cfg)) | {""}
    text = source.train.astype(str).apply(lambda col: col.str.strip())
    missing = text.isin(markers).drop(columns=[source.schema.label]).sum(axis=1).to_numpy()
    labels = pd.Series(normalise_labels(source.train[source.schema.label]))
    groups = None
    if cfg.data.partition == "natural" and not source.files:
        groups = natural_groups(_train_labels_and_groups(cfg)[1], cfg.num_clients)
    for client, rows in enumerate(partitions(cfg)):
        counts = labels.iloc[rows].value_counts()
        report.append(_report_row(client, len(rows), [int(counts.get(c, 0)) for c in names],
                                  names, int(missing[rows].sum())))
        if groups is not None:  # which values of the natural column this client holds
            report[-1][cfg.data.natural_column] = " + ".join(groups[client])
    return report


def _regression_report(cfg: ExperimentConfig) -> list[dict]:
    source = _source(cfg)
    markers = set(missing_markers(cfg)) | {""}
    text = source.train.astype(str).apply(lambda col: col.str.strip())
    missing = text.isin(markers).drop(columns=[source.schema.label]).sum(axis=1).to_numpy()
    targets = _train_targets(cfg)
    groups = None
    if cfg.data.partition == "natural" and not source.files:
        groups = natural_groups(_train_labels_and_groups(cfg)[1], cfg.num_clients)
    report = []
    for client, rows in enumerate(partitions(cfg)):
        y = targets[rows]
        y = y[~np.isnan(y)]
        report.append({"client": client, "rows": len(rows),
                       "label-mean": round(float(y.mean()), 4) if len(y) else None,
                       "label-std": round(float(y.std()), 4) if len(y) else None,
                       "missing-cells": int(missing[rows].sum())})
        if groups is not None:
            report[-1][cfg.data.natural_column] = " + ".join(groups[client])
    return report


def _report_row(client: int, rows: int, counts, names, missing: int) -> dict:
    row = {"client": client, "rows": rows}
    row.update({f"label={n}": int(c) for n, c in zip(names, counts)})
    row["majority-share"] = round(max(counts) / rows, 4) if rows else 0.0
    row["missing-cells"] = missing
    return row
