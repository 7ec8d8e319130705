"""A user's own dataset by import path: `[data] dataset = "package.module:loader"`.

The contract (also in the README, "Your own data"):

- `loader` is a function, found as Flower finds `module:attr` components: in the installed
  packages, the Flower app folder or the current folder (privet.common.imports.import_attr). It is
  called as `loader(data)` with the `[data]` settings (common.config.DataConfig: `data.path`,
  `data.test-path`, ... for it to read as it likes), or as `loader()` when it takes no
  argument. In simulation every client process calls it once (cached per process) and keeps
  its own partition, as for the shipped datasets; a deployed node calls it with `data.path`
  set to its own `data-path`, and all it returns is that node's rows.
- It returns the training rows as one of:
  - a pandas DataFrame: a table, cleaned and preprocessed as privet does a CSV file
    (`data.label` names the label column; `data.classes`, `data.categories`,
    `data.column-types`, `data.bounds` apply);
  - a pair of arrays `(features, labels)` (numpy, or anything numpy converts: torch
    tensors, lists), optionally with class names `(features, labels, classes)`: features are
    numbers of shape (rows, *example shape) — (rows, features) for a table that is already
    numeric, (rows, channels, height, width) for images — used as they are (no tabular
    preprocessing: scale them yourself); labels are (rows,) class values;
  - a torch `Dataset` of `(x, y)` pairs (x a tensor or array, y a class value), read once
    into arrays as above (its `classes` attribute, when present, names the classes);
  - or a dict `{"train": ..., "test": ...}` of two of the same kind, the second being the
    server's test split. Without one, `data.test-fraction` of the rows is held out
    (seeded), as for a CSV file.
- Class values: with `data.classes` declared, integer labels index it and other labels must
  be among it; otherwise the classes are the sorted distinct values of train and test
  (integers as integers).

Anything else — a module that does not import, a missing attribute, a loader that raises,
returns another type, or arrays of the wrong shape or with non-finite values — raises
DatasetError, one line starting `data.dataset = '<the path>':` and saying what was expected.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from privet.common.config import DataConfig, shaped
from privet.common.data import tables
from privet.common.data.images import ImageSplit, _frozen
from privet.common.imports import import_attr, one_line

EXPECTED = ("a pandas DataFrame, arrays (features, labels), a torch Dataset of (x, y) pairs, "
            "or a dict {'train': ..., 'test': ...} of those")


class DatasetError(tables.DataError):
    """A user's loader that cannot be used: one line naming `data.dataset`, the import path,
    and what was expected."""


@dataclass(frozen=True, eq=False)
class Loaded:
    """What a loader returned, checked: frames (a table) or arrays, never both."""
    reference: str
    train_frame: pd.DataFrame | None = None   # a table: raw cells, as the loader gave them
    test_frame: pd.DataFrame | None = None
    train: ImageSplit | None = None           # arrays: float32 features, int64 labels
    test: ImageSplit | None = None

    @property
    def tabular(self) -> bool:
        return self.train_frame is not None


def _fail(reference: str, message: str) -> DatasetError:
    return DatasetError(f"data.dataset = {reference!r}: {message}")


def _call(reference: str, function, data: DataConfig):
    """`function(data)`, or `function()` when it takes no argument."""
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: give it the config
        signature = None
    arguments: tuple = (data,)
    if signature is not None:
        try:
            signature.bind(data)
        except TypeError:
            try:
                signature.bind()
                arguments = ()
            except TypeError:
                raise _fail(reference, f"the loader takes {signature}; expected a function "
                                       "of the [data] settings, or of nothing") from None
    try:
        return function(*arguments)
    except tables.DataError as error:  # its own one-line message, already named
        raise _fail(reference, f"the loader failed: {one_line(error)}") from None
    except Exception as error:  # noqa: BLE001 - the user's code: one line, what it said
        raise _fail(reference, f"the loader failed: {type(error).__name__}: "
                               f"{one_line(error)}") from None


@functools.lru_cache(maxsize=4)
def load(data: DataConfig) -> Loaded:
    """Import and call the loader `data.dataset` names, once per process and config, and
    check what it returned (see the module doc). Raises DatasetError (one line)."""
    reference = data.dataset
    function = import_attr(reference, "data.dataset", DatasetError, "loader")
    result = _call(reference, function, data)
    if isinstance(result, Mapping):
        unknown = sorted(map(str, set(result) - {"train", "test"}))
        if "train" not in result or unknown:
            raise _fail(reference, f"the loader returned a dict with keys "
                                   f"{sorted(map(str, result))}; expected 'train' and "
                                   "optionally 'test'")
        train, test = result["train"], result.get("test")
    else:
        train, test = result, None
    train_kind, test_kind = _kind(reference, train, "train"), \
        (None if test is None else _kind(reference, test, "test"))
    if test_kind is not None and test_kind != train_kind:
        raise _fail(reference, f"the loader returned {train_kind} for 'train' and {test_kind} "
                               "for 'test'; expected the same kind for both")
    if train_kind == "a DataFrame":
        for part, frame in (("train", train), ("test", test)):
            if frame is not None and len(frame) == 0:
                raise _fail(reference, f"the loader's {part} DataFrame has no rows")
        return Loaded(reference, train_frame=train, test_frame=test)
    parts = [_arrays(reference, value, part)
             for part, value in (("train", train), ("test", test)) if value is not None]
    features = [p[0] for p in parts]
    if len(features) == 2 and features[0].shape[1:] != features[1].shape[1:]:
        raise _fail(reference, f"train examples have shape {features[0].shape[1:]} and test "
                               f"examples {features[1].shape[1:]}; expected the same")
    found = not shaped(data.classes, []) and all(p[2] is None for p in parts)
    names = _classes(reference, data, [p[2] for p in parts], [p[1] for p in parts])
    splits = [_frozen(x, _encode(reference, y, names, found, part), names)
              for (x, y, _), part in zip(parts, ("train", "test"))]
    return Loaded(reference, train=splits[0], test=splits[1] if len(splits) > 1 else None)


def load_node(data: DataConfig, data_path: str) -> Loaded:
    """A deployed node's own rows: the loader called with `data.path` = its `data-path`."""
    return load(replace(data, path=data_path))


def _kind(reference: str, value, part: str) -> str:
    if isinstance(value, pd.DataFrame):
        return "a DataFrame"
    if _is_dataset(value):
        return "arrays"  # read into arrays
    if isinstance(value, tuple) and len(value) in (2, 3) and _array_like(value[0]):
        return "arrays"
    where = "" if part == "train" else " for 'test'"
    shown = type(value).__name__
    if isinstance(value, tuple):
        shown = f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value[:4])})"
    raise _fail(reference, f"the loader returned {shown}{where}; expected {EXPECTED}")


def _is_dataset(value) -> bool:
    try:
        from torch.utils.data import Dataset, IterableDataset
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(value, (Dataset, IterableDataset))


def _array_like(value) -> bool:
    if isinstance(value, (np.ndarray, list)):
        return True
    try:
        import torch
        return isinstance(value, torch.Tensor)
    except ImportError:  # pragma: no cover
        return False


def _arrays(reference: str, value, part: str
            ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """(features float32 (rows, ...), raw labels (rows,), class names or None)."""
    names = None
    if _is_dataset(value):
        features, labels, names = _materialise(reference, value, part)
    else:
        features, labels = value[0], value[1]
        if len(value) == 3:
            names = tuple(str(n) for n in value[2])
    try:
        x = np.asarray(features)
    except Exception as error:  # noqa: BLE001 - ragged lists and the like
        raise _fail(reference, f"{part} features: cannot make an array of them "
                               f"({one_line(error)}); expected numbers of shape (rows, "
                               "*example shape)") from None
    if x.dtype.kind not in "biuf":
        raise _fail(reference, f"{part} features hold {x.dtype}; expected numbers of shape "
                               "(rows, features) or (rows, channels, height, width)")
    if x.ndim < 2:
        raise _fail(reference, f"{part} features have shape {x.shape}; expected (rows, "
                               "features) or (rows, channels, height, width)")
    y = np.asarray(labels)
    if y.ndim != 1 or len(y) != len(x):
        raise _fail(reference, f"{part} labels have shape {y.shape} for {len(x)} rows of "
                               f"features; expected ({len(x)},), one class value per row")
    if len(x) == 0:
        raise _fail(reference, f"{part}: no rows")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise _fail(reference, f"{part} features: {int(bad.sum())} row(s) with values that are "
                               f"not finite (NaN or infinite), e.g. row {int(np.argmax(bad))};"
                               " expected finite numbers (a DataFrame gets missing values "
                               "imputed)")
    return x, y, names


def _materialise(reference: str, dataset, part: str
                 ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...] | None]:
    """A torch Dataset's (x, y) pairs as arrays (features stacked, labels as given)."""
    import torch

    try:
        items = ([dataset[i] for i in range(len(dataset))] if hasattr(dataset, "__len__")
                 else list(dataset))
    except Exception as error:  # noqa: BLE001 - the user's Dataset failed
        raise _fail(reference, f"reading the {part} Dataset failed: {type(error).__name__}: "
                               f"{one_line(error)}") from None
    xs, ys = [], []
    for i, item in enumerate(items):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise _fail(reference, f"{part} Dataset item {i} is {type(item).__name__}; "
                                   "expected an (x, y) pair")
        x, y = item
        if not isinstance(x, (torch.Tensor, np.ndarray, list, int, float)):
            raise _fail(reference, f"{part} Dataset item {i}: x is {type(x).__name__}; "
                                   "expected a tensor or numpy array (give the Dataset a "
                                   "transform such as torchvision's ToTensor)")
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        if xs and x.shape != xs[0].shape:
            raise _fail(reference, f"{part} Dataset item {i}: x has shape {x.shape}, item 0 "
                                   f"{xs[0].shape}; expected one shape for every example")
        if isinstance(y, torch.Tensor):
            y = y.item() if y.numel() == 1 else y.tolist()
        xs.append(x)
        ys.append(y)
    if not xs:
        raise _fail(reference, f"the {part} Dataset is empty")
    names = getattr(dataset, "classes", None)
    names = tuple(str(n) for n in names) if isinstance(names, (list, tuple)) else None
    return np.stack(xs), np.asarray(ys), names


def _integral(y: np.ndarray) -> bool:
    if y.dtype.kind in "biu":
        return True
    return y.dtype.kind == "f" and bool(np.all(np.isfinite(y))) and bool(np.all(y == np.round(y)))


def _classes(reference: str, data: DataConfig, given: list, labels: list[np.ndarray]
             ) -> tuple[str, ...]:
    """`data.classes`, else the names the loader gave (the same for both parts), else the
    sorted distinct label values of both parts (integers as integers, text as
    tables.normalise_label reads it)."""
    declared = shaped(data.classes, [])
    if declared:
        return tuple(str(c) for c in declared)
    named = {g for g in given if g is not None}
    if len(named) > 1:
        raise _fail(reference, f"train and test name different classes {sorted(named)}; "
                               "expected the same")
    if named:
        return next(iter(named))
    if all(_integral(y) for y in labels):
        return tuple(str(v) for v in np.unique(np.concatenate(labels).astype(np.int64)))
    if any(y.dtype.kind == "f" for y in labels):
        raise _fail(reference, "labels are fractional numbers; expected class values "
                               "(integers or text)")
    return tuple(sorted({tables.normalise_label(v) for y in labels for v in y.tolist()}))


def _encode(reference: str, y: np.ndarray, names: tuple[str, ...], found: bool, part: str
            ) -> np.ndarray:
    """Labels as int64 indices into `names`: integer labels index declared or given names;
    otherwise each label is looked up by its value."""
    if _integral(y) and not found:
        index = y.astype(np.int64)
        outside = sorted(set(index[(index < 0) | (index >= len(names))].tolist()))
        if outside:
            raise _fail(reference, f"{part} labels {outside[:5]} outside 0..{len(names) - 1}, "
                                   f"the indices of the classes {list(names)}")
        return index
    lookup = {name: i for i, name in enumerate(names)}
    values = ([str(int(v)) for v in y.tolist()] if _integral(y)
              else [tables.normalise_label(v) for v in y.tolist()])
    unknown = sorted({v for v in values if v not in lookup})
    if unknown:
        raise _fail(reference, f"{part} label value(s) {unknown[:5]} not among the classes "
                               f"{list(names)}")
    return np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values))
