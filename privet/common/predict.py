"""Scoring new rows with a run's model: `privet predict RUN_DIR FILE` and `Run.predict`.

Rows go the way the run's test rows went, from the run directory alone (config.toml,
model.json, model.pt): read with privet's reader (CSV, TSV, gzip or Parquet; a DataFrame from
Python), cleaned as the clients cleaned theirs (cells trimmed, the run's missing markers, each
numeric column read in the number format found in training), encoded with the transform in
model.json (the shared transform the server fitted from the clients' noised statistics, or
one that needs no statistics; values outside a vocabulary go to `other`, missing values are
imputed), and scored by the global model in the batches the server evaluates with, so that
the run's own test file gets exactly the run's test accuracy. Nothing is dropped: every row
read gets a prediction; a label column, if present, is only used to print the accuracy (or
RMSE, MAE and R²). Lines a run that skips bad lines (`data.bad-lines = "skip"`) skips are
named. A cell that is not a number in a numeric column is an error here (training treats it
as missing and counts it), so that no prediction silently rests on a guess; non-finite
numbers (`inf`, `nan`) are missing values, as in training, and named.

Refused, in one line: a run whose clients each encoded their rows their own way
(`preprocess.fit = "local"` with statistics: no one encoding is the model's), a directory
that is not a run, a run without a finished round.
"""

from __future__ import annotations

import csv
import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from privet.common import results, saved_model
from privet.common.config import ConfigError, ExperimentConfig, load_config, shaped
from privet.common.data import adult, tables
from privet.common.data.numbers import PLAIN
from privet.common.data.preprocess import clean
from privet.common.data.tables import DataError

BATCH = 4096  # rows per forward pass: the server's evaluation batch (common.evaluation)
_LABEL = "\x00label"  # clean() wants a label column; scoring keeps every row
_SHOWN = 5


class PredictError(ValueError):
    """The run cannot score rows, or the input is not something it can score: one line
    naming the run directory or the file (line, column) and what was expected."""


@dataclass
class Scored:
    """`table`: one row per scored input row (see `Predictor`); `scores`: on the labelled
    rows, or None; `notes`: one line each, what was done to the rows."""
    table: pd.DataFrame
    scores: dict | None = None
    notes: list[str] = field(default_factory=list)


def _listing(items, shown: int = _SHOWN) -> str:
    items = list(items)
    text = ", ".join(str(i) for i in items[:shown])
    return text + (f" … ({len(items)} in all)" if len(items) > shown else "")


class Predictor:
    """A run's model with what it needs to score rows. Raises PredictError: not a run
    directory, no finished round, a model that cannot be rebuilt, or rows encoded per client
    (nothing to encode new rows with)."""

    def __init__(self, run_dir: str | Path) -> None:
        from privet.common.models import ModelError

        self.run_dir = run_dir = Path(run_dir)
        if not run_dir.is_dir():
            what = "not a folder" if run_dir.exists() else "no such folder"
            raise PredictError(f"{run_dir}: {what}; expected a privet run directory")
        if not (run_dir / results.SUMMARY).is_file() or \
                not (run_dir / results.CONFIG).is_file():
            raise PredictError(f"{run_dir}: not a privet run directory (no "
                               f"{results.SUMMARY} and {results.CONFIG})")
        try:
            self.cfg = cfg = load_config(run_dir / results.CONFIG)
        except ConfigError as error:
            raise PredictError(str(error)) from None
        try:
            self.spec = spec = saved_model.read(run_dir, cfg)
        except (DataError, FileNotFoundError, ValueError) as error:
            if (run_dir / results.MODEL_SPEC).is_file():
                raise PredictError(str(error)) from None
            raise PredictError(f"{run_dir}: no {results.MODEL_SPEC} (a run from before privet "
                               f"saved one), and rebuilding it needs the run's data: {error}"
                               ) from None
        if spec.encoding == "per-client":
            raise PredictError(refusal(run_dir, cfg))
        if not (run_dir / results.MODEL).is_file():
            raise PredictError(f"{run_dir}: no {results.MODEL}: no round has finished yet")
        try:
            self.model = saved_model.build(cfg, spec, run_dir)
        except ModelError as error:
            raise PredictError(f"{run_dir}: {error}") from None
        except (RuntimeError, OSError, EOFError) as error:  # damaged weights, other shapes
            raise PredictError(f"{run_dir}: {results.MODEL} does not load into train.model "
                               f"= {cfg.train.model!r}: {str(error).splitlines()[0]}") from None
        self.transform = spec.fitted_transform()
        self.markers = list(shaped(cfg.preprocess.missing_markers, []))

    # --- inputs ---------------------------------------------------------------------------

    def score_file(self, path: str | Path) -> Scored:
        """A file (tables: CSV/TSV/Parquet, gzipped text too; Adult's own headerless UCI
        files are read as the shipped test file is) or, for image runs, an image or a folder
        of images. Output columns: `row` (1-based, in file order; `line`, the text file's
        line, too) or `file` (images), then `prediction` and `prob_<class>` per class."""
        if self.spec.data == "table":
            return self.score_table(self.read_table(path))
        if self.spec.data == "images":
            return self.score_images(Path(path))
        raise PredictError(f"{self.run_dir}: the run trained on arrays from data.dataset = "
                           f"{self.spec.dataset!r}, used as the loader made them; score such "
                           "arrays from Python: privet.load_run(RUN_DIR).predict(array)")

    def score_python(self, rows, labels=None) -> Scored:
        """`Run.predict`: a DataFrame for a table run (its index kept), arrays otherwise."""
        if self.spec.data == "table":
            if not isinstance(rows, pd.DataFrame):
                raise PredictError(f"rows: {type(rows).__name__}; expected a pandas DataFrame "
                                   "with the run's feature columns")
            if labels is not None:
                raise PredictError("labels=: for a table the frame's label column "
                                   f"{self.spec.label!r} gives them")
            raw = tables.from_frame(rows, label=None, where="rows")
            typed = {str(c).strip() for c in rows.columns  # numbers already: as Python writes
                     if pd.api.types.is_numeric_dtype(rows[c])}  # them, whatever the file's
            return self.score_table(raw, index=rows.index, plain=typed)
        if isinstance(rows, pd.DataFrame):
            raise PredictError(f"rows: a DataFrame; the run's model takes arrays of examples "
                               f"of shape {self.spec.input_shape}")
        return self.score_arrays(rows, labels)

    def read_table(self, path: str | Path) -> tables.RawTable:
        path = Path(path)
        header = tuple(adult.COLUMNS) if self.spec.dataset == "adult" and \
            _headerless_adult(path) else ()
        return tables.read_table(path, label=None, bad_lines=self.cfg.data.bad_lines,
                                 header=header, comment="|" if header else "", setting="")

    # --- tables ---------------------------------------------------------------------------

    def score_table(self, raw: tables.RawTable, index: pd.Index | None = None,
                    plain: frozenset[str] | set[str] = frozenset()) -> Scored:
        """Clean, encode and score a table's rows (see the module doc); `index` (a frame's)
        labels the output rows, else `row` and `line` columns do; the numbers of `plain`
        columns (a frame's numeric dtypes) are read as Python writes them, not in the
        format training found in its files."""
        spec, transform = self.spec, self.transform
        frame = raw.frame
        formats = {c: f for c, f in spec.formats.items() if c not in plain}

        def where(line: int) -> str:
            return f"rows, index {index[line - 1]!r}" if index is not None else raw.at(line)

        numeric = [s.column for s in transform.numeric]
        categorical = [s.column for s in transform.categorical]
        needed = numeric + categorical
        absent = [c for c in needed if c not in frame.columns]
        if absent:
            raise DataError(f"{raw.path}: column(s) {_listing(map(repr, absent))} missing; "
                            f"expected the run's feature columns {', '.join(needed)} (the "
                            f"label {spec.label!r} and other columns are optional)")
        notes = []
        if raw.skipped_lines:
            notes.append(f"{raw.path}: skipped {len(raw.skipped_lines)} line(s) with the wrong "
                         f"number of fields (the run's data.bad-lines = \"skip\"), which get "
                         f"no prediction: {_listing(raw.skipped_lines)}")
        bad = tables.check_numeric(raw, numeric, self.markers, formats)
        for column, kinds in bad.items():
            cells = kinds.get("non-numeric")
            if cells:
                fmt = formats.get(column, PLAIN)
                written = "" if fmt.plain else f" ({fmt.describe()}, as in training)"
                more = f"; {len(cells)} such cells in this column" if len(cells) > 1 else ""
                raise DataError(
                    f"{where(cells[0][0])}: column {column!r}: {tables._show(cells[0][1])} is "
                    f"not a number; expected a number{written}, or an empty cell or a missing "
                    f"marker ({', '.join(map(repr, self.markers))}) to have it imputed{more}")
            cells = kinds.get("non-finite", [])
            if cells:
                notes.append(f"column {column!r}: {len(cells)} non-finite value(s) treated as "
                             f"missing (imputed), as in training: " + _listing(
                                 f"{where(line)}: {value!r}" for line, value in cells[:3]))
        chosen = frame[needed].copy()
        if spec.dataset == "adult" and adult.LABEL in categorical:  # as the server's test rows
            chosen[adult.LABEL] = [tables.normalise_label(v) for v in chosen[adult.LABEL]]
        chosen[_LABEL] = "x"  # every row kept: no label needed, duplicates scored too
        cleaned, _ = clean(chosen, numeric=numeric, label=_LABEL, missing_markers=self.markers,
                           drop_duplicates=False, formats=formats)
        for step in transform.categorical:
            values = cleaned[step.column]
            outside = np.flatnonzero(values.notna().to_numpy()
                                     & ~values.isin(step.vocabulary).to_numpy())
            if len(outside):
                shown = list(dict.fromkeys(values.iloc[outside].tolist()))
                notes.append(f"column {step.column!r}: {len(outside)} row(s) with a value "
                             f"outside the run's vocabulary ({_listing(map(repr, shown), 3)}), "
                             f"encoded as `other` as the transform does; first at "
                             f"{where(int(raw.lines[outside[0]]))}")
        features = transform.apply(cleaned)
        labels, label_notes = self._table_labels(raw, where, formats)
        scored = self._score(features, labels)
        if index is not None:
            scored.table.index = index
        else:
            front = {"row": np.arange(1, len(frame) + 1)}
            if raw.unit == "line":
                front["line"] = raw.lines
            scored.table = pd.concat([pd.DataFrame(front), scored.table], axis=1)
        scored.notes = notes + label_notes + scored.notes
        return scored

    def _table_labels(self, raw: tables.RawTable, where, formats
                      ) -> tuple[np.ndarray | None, list[str]]:
        """The label column's values as class indices (-1: none or not a class) or numbers
        (NaN: none); None without a label column."""
        spec = self.spec
        if spec.label not in raw.frame.columns:
            return None, []
        values = raw.frame[spec.label].astype("string").str.strip()
        missing = (values.isna() | values.isin(self.markers) | (values == "")).to_numpy()
        notes = []
        if missing.any():
            notes.append(f"label column {spec.label!r}: {int(missing.sum())} row(s) without a "
                         f"label, left out of the scores: "
                         + _listing(where(int(raw.lines[i])) for i in np.flatnonzero(missing)))
        if spec.regression:
            fmt = formats.get(spec.label, PLAIN)
            y = np.array(fmt.parse(values.mask(missing)), dtype=float)
            bad = np.flatnonzero(~np.isfinite(y) & ~missing)
            if len(bad):
                notes.append(f"label column {spec.label!r}: {len(bad)} value(s) that are not "
                             f"finite numbers, left out of the scores: " + _listing(
                                 f"{where(int(raw.lines[i]))}: {values.iloc[i]!r}"
                                 for i in bad))
            y[bad] = np.nan
            return y, notes
        lookup = {c: i for i, c in enumerate(spec.classes)}
        normalised = [None if m else tables.normalise_label(v) for v, m in zip(values, missing)]
        y = np.array([-1 if v is None else lookup.get(v, -1) for v in normalised], dtype=np.int64)
        unknown = [i for i, v in enumerate(normalised) if v is not None and v not in lookup]
        if unknown:
            notes.append(f"label column {spec.label!r}: {len(unknown)} row(s) whose label is "
                         f"not a class of the run ({', '.join(map(repr, spec.classes))}), left "
                         f"out of the scores: " + _listing(
                             f"{where(int(raw.lines[i]))}: {values.iloc[i]!r}" for i in unknown))
        return y, notes

    # --- images and arrays ----------------------------------------------------------------

    def score_images(self, path: Path) -> Scored:
        """An image file, or a folder of them: images directly in it are unlabelled, images
        under a subfolder named after a class are labelled with it (an image-folder
        layout). Each is read as training read them: converted to the run's channels,
        resized to its size, scaled to [0, 1]."""
        from privet.common.data.images import IMAGE_SUFFIXES, _hidden, _read_image

        if not path.exists():
            raise PredictError(f"{path}: no such file or folder; expected an image or a "
                               "folder of images")
        if path.is_file():
            files, root = [path], path.parent
        else:
            root = path
            found = sorted(f for f in path.rglob("*") if f.is_file() and not _hidden(f, path))
            files = [f for f in found if f.suffix.lower() in IMAGE_SUFFIXES]
            if not files:
                raise PredictError(f"{path}: no images in this folder; expected image files "
                                   f"({', '.join(IMAGE_SUFFIXES)})")
        channels, height, width = self.spec.input_shape
        names = [str(f.relative_to(root)) for f in files]
        lookup = {c: i for i, c in enumerate(self.spec.classes)}
        labels = np.array([lookup.get(Path(n).parts[0], -1) if len(Path(n).parts) > 1 else -1
                           for n in names], dtype=np.int64)
        pixels = np.empty((len(files), channels, height, width), dtype=np.float32)
        for i, file in enumerate(files):
            pixels[i] = _read_image(file, height, channels)
        scored = self._score(pixels, labels if (labels >= 0).any() else None)
        scored.table.insert(0, "file", names)
        others = sorted({Path(n).parts[0] for n, y in zip(names, labels)
                         if y < 0 and len(Path(n).parts) > 1})
        if others:
            scored.notes.insert(0, f"{path}: subfolder(s) {_listing(map(repr, others))} are "
                                   "not classes of the run: their images are unlabelled")
        return scored

    def score_arrays(self, rows, labels=None) -> Scored:
        """(N, *input_shape) float examples, or one; `labels` (N,) class indices or names
        (regression: numbers in the label's units), optional."""
        shape = self.spec.input_shape
        if hasattr(rows, "detach"):
            rows = rows.detach().cpu().numpy()
        try:
            x = np.array(rows, dtype=np.float32)  # a copy: torch wants it writable
        except (TypeError, ValueError) as error:
            raise PredictError(f"rows: not numbers ({error}); expected an array of shape "
                               f"(N, {', '.join(map(str, shape))})") from None
        if x.shape == shape:
            x = x[None]
        if x.ndim != len(shape) + 1 or x.shape[1:] != shape:
            raise PredictError(f"rows of shape {x.shape}: expected (N, "
                               f"{', '.join(map(str, shape))}), examples of the run's input "
                               "shape")
        if not np.isfinite(x).all():
            bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
            raise PredictError(f"rows: {bad} example(s) hold NaN or infinite values; expected "
                               "finite numbers")
        y = None
        if labels is not None:
            given = np.asarray(labels.detach().cpu().numpy() if hasattr(labels, "detach")
                               else labels).reshape(-1)
            if len(given) != len(x):
                raise PredictError(f"labels: {len(given)} for {len(x)} example(s)")
            if self.spec.regression:
                y = given.astype(float)
            else:
                lookup = {c: i for i, c in enumerate(self.spec.classes)}
                try:
                    y = np.array([int(v) if isinstance(v, (int, np.integer)) else
                                  lookup[tables.normalise_label(v)] for v in given.tolist()],
                                 dtype=np.int64)
                except KeyError as error:
                    raise PredictError(f"labels: {error.args[0]!r} is not a class of the run "
                                       f"({', '.join(map(repr, self.spec.classes))})") from None
                if ((y < 0) | (y >= len(self.spec.classes))).any():
                    raise PredictError(f"labels: class indices outside 0.."
                                       f"{len(self.spec.classes) - 1}")
        return self._score(np.ascontiguousarray(x), y)

    # --- scoring --------------------------------------------------------------------------

    def _score(self, features: np.ndarray, labels: np.ndarray | None) -> Scored:
        """The model's predictions (`prediction`, `prob_<class>`) for encoded rows, and the
        scores on the labelled ones (labels: class indices, -1 = none; regression: numbers
        in the label's units, NaN = none)."""
        import torch

        from privet.common.evaluation import logits

        spec = self.spec
        out = logits(self.model, features, BATCH, "cpu")
        if spec.regression:
            predicted = spec.target.decode(out[:, 0].double().numpy())
            table = pd.DataFrame({"prediction": predicted})
            scores = None
            if labels is not None:
                known = np.isfinite(labels)
                scores = _regression_scores(predicted[known], labels[known])
            return Scored(table, scores)
        chosen = out.argmax(1).numpy()  # as the server scores: argmax of the float32 logits
        probabilities = torch.softmax(out.double(), 1).numpy()
        table = pd.DataFrame({"prediction": np.asarray(spec.classes, dtype=object)[chosen]})
        for i, name in enumerate(spec.classes):
            table[f"prob_{name}"] = probabilities[:, i]
        scores = None
        if labels is not None:
            known = labels >= 0
            correct = int((chosen[known] == labels[known]).sum())
            rows = int(known.sum())
            scores = {"accuracy": correct / rows if rows else float("nan"), "correct": correct,
                      "rows": rows}
        return Scored(table, scores)


def _regression_scores(predicted: np.ndarray, y: np.ndarray) -> dict:
    rows = len(y)
    if not rows:
        return {"rmse": float("nan"), "mae": float("nan"), "r2": float("nan"), "rows": 0}
    errors = predicted - y
    total = float(((y - y.mean()) ** 2).sum())
    return {"rmse": float(np.sqrt((errors ** 2).sum() / rows)),
            "mae": float(np.abs(errors).sum() / rows),
            "r2": 1.0 - float((errors ** 2).sum()) / total if total > 0 else float("nan"),
            "rows": rows}


def refusal(run_dir: Path, cfg: ExperimentConfig) -> str:
    """Why a run whose clients fitted their own transforms scores no new rows, and what to
    do: one line."""
    how = "preprocess.fit = \"local\"" if cfg.preprocess.fit == "local" else \
        f"preprocess.fit = \"auto\", local at privacy.level = \"{cfg.privacy.level}\""
    return (f"{run_dir}: cannot score new rows: each client encoded its rows with a transform "
            f"fitted on its own rows ({how}), so no one encoding is the model's and privet "
            "saves none to encode new rows with; re-run with preprocess.fit = \"federated\" (one "
            "transform fitted from the clients' noised statistics, saved with the model), or, "
            "at user level, with preprocessing that needs no statistics (preprocess.scaling = "
            "\"bounds\" with data.bounds, impute-numeric = \"constant\", impute-categorical = "
            "\"other\")")


def _headerless_adult(path: Path) -> bool:
    """Whether a text file is laid out as UCI's Adult files are: no header, 15 fields a
    line, and (the test file) a first line starting with "|"."""
    try:
        with path.open("rb") as f:
            head = f.read(1 << 16)
        if head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                head = f.read(1 << 16)
    except (OSError, EOFError):
        return False  # the reader says what is wrong
    for line in head.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        if line.startswith("|"):
            return True
        fields = [f.strip() for f in next(csv.reader(io.StringIO(line)))]
        return (len(fields) == len(adult.COLUMNS) and not set(fields) & set(adult.COLUMNS)
                and fields[0].isdigit())  # an age: a row, not a header
    return False


def written_by_privet(path: Path) -> bool:
    """Whether `path` is a CSV file that `privet predict` wrote (its header is privet's:
    `row` or `file` first, a `prediction` column)."""
    try:
        with path.open("r", encoding="utf-8", newline="") as f:
            first = f.readline(1 << 16)
    except (OSError, UnicodeDecodeError):
        return False
    fields = next(csv.reader(io.StringIO(first)), [])
    return bool(fields) and fields[0] in ("row", "file") and "prediction" in fields[:3]


def check_out(out: Path, inputs: Path) -> None:
    """Refuse an --out privet must not write: a folder, the input, a file it did not write."""
    if out.is_dir():
        raise PredictError(f"--out {out}: a folder; expected the path of a CSV file to write")
    if out.exists():
        if inputs.exists() and out.resolve() == inputs.resolve():
            raise PredictError(f"--out {out}: the input file; choose another path")
        if not written_by_privet(out):
            raise PredictError(f"--out {out}: exists and was not written by privet predict; "
                               "choose another path (privet never writes over a file it did "
                               "not write)")


def write(table: pd.DataFrame, out: Path) -> None:
    """The predictions as CSV, written whole through a temporary file and a rename."""
    try:
        results.atomic_write_text(out, table.to_csv(index=False))
    except OSError as error:
        raise PredictError(f"--out {out}: cannot write ({(error.strerror or str(error)).lower()})"
                           ) from None
