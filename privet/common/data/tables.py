"""Reading people's own tables (CSV, Parquet) with errors that say where and what.

Cells stay text here: trimming, missing markers and number parsing are
`preprocess.clean`'s job, so the counts it reports cover every change made to the data.
Every error is a `DataError` whose one-line message names the file, the line (or row)
or column, what was found and what was expected, and the setting that changes it.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import difflib
import gzip
import io
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from privet.common.data.numbers import PLAIN, NumberFormat, infer_format

TEXT_SUFFIXES = (".csv", ".tsv", ".txt")
PARQUET_SUFFIXES = (".parquet", ".pq")
DELIMITERS = (",", ";", "\t", "|")  # sniffing order doubles as the tie-break
COLUMN_TYPES = ("numeric", "categorical", "ignore")
NUMERIC_SHARE = 0.95  # a column is numeric when this share of its present cells parse
_SHOWN = 5  # lines or values a message names before "N in all"
_SNIFF_CHARS = 1 << 16


class DataError(ValueError):
    """Bad input data; the message names the file, line/column and what was expected."""


@dataclass(frozen=True, eq=False)  # eq=False: comparing frames/arrays field-wise is ambiguous
class RawTable:
    frame: pd.DataFrame  # every cell a str, columns as in the header; index = 0..n-1
    lines: np.ndarray  # 1-based source line of each row (CSV); row number + 1 (Parquet)
    path: Path
    skipped_lines: tuple[int, ...] = ()  # lines skipped because of bad_lines="skip"
    unit: str = "line"  # what `lines` counts: "line" (text files) or "row" (Parquet)
    delimiter: str = ""  # of a text file ("" for Parquet): a hint for how numbers are written

    def at(self, line: int) -> str:
        """Where a row came from, for messages: "data.csv, line 17"."""
        return f"{self.path}, {self.unit} {line}"


@dataclass(frozen=True)
class TableSchema:
    numeric: tuple[str, ...]
    categories: dict[str, tuple[str, ...]]  # vocabulary per categorical column; () = unknown
    label: str
    classes: tuple[str, ...]
    # Columns left out: typed "ignore" in data.column-types, or with no value at all.
    ignored: tuple[str, ...] = ()
    # numeric columns whose numbers are not written plainly (1,234.5; 25,165 in a ; file)
    formats: dict[str, NumberFormat] = dataclasses.field(default_factory=dict)
    # one line per column whose type fell back to categorical, for the user, before the run
    fallbacks: tuple[str, ...] = ()


# --- reading ----------------------------------------------------------------------------


def read_table(path: str | Path, *, label: str | None, bad_lines: str = "error",
               header: tuple[str, ...] = (), comment: str = "",
               setting: str = "data.path") -> RawTable:
    """One CSV/TSV/TXT (optionally gzipped) or Parquet file, every cell as text.

    The format follows the suffix (.parquet/.pq, else text), with the file's first bytes
    overriding it (Parquet and gzip have magic numbers). The delimiter of a text file is
    sniffed among , ; tab | (.tsv: tab). A line with the wrong number of fields stops the
    read (bad_lines="error") or is skipped and listed in `skipped_lines` ("skip");
    malformed quoting is always an error, since skipping it could swallow the rest of
    the file.

    `label` must be a column (None: no label is needed, as when scoring new rows). A text
    file given `header` (column names) has none of its own: every line is a row; lines
    starting with `comment` (UCI's "|") are passed over. `setting` is what messages name as
    where the path came from ("" names nothing).
    """
    if bad_lines not in ("error", "skip"):
        raise ValueError(f"bad_lines = {bad_lines!r}: expected 'error' or 'skip'")
    path = Path(path)
    named = f" ({setting})" if setting else ""
    if path.is_dir():
        raise DataError(f"{path}: a folder, not a file; expected a CSV or Parquet file{named}")
    if not path.is_file():
        raise DataError(f"{path}: no such file; expected a CSV or Parquet file{named}")
    try:
        with path.open("rb") as f:
            head = f.read(4)
        if head == b"PAR1" or (path.suffix.lower() in PARQUET_SUFFIXES
                               and head[:2] != b"\x1f\x8b"):
            return _read_parquet(path, label)
        return _read_text(path, head, label, bad_lines, header, comment, named)
    except OSError as error:  # permission denied, a vanished file, an I/O error
        reason = (error.strerror or str(error)).lower()
        raise DataError(f"{path}: {reason}; expected a readable CSV or Parquet file{named}"
                        ) from None


def read_folder(path: str | Path, *, label: str, bad_lines: str = "error") -> list[RawTable]:
    """A folder with one data file per client: client i reads the i-th file.

    Files sort by name with numbers compared as numbers (client2 before client10).
    Hidden files are passed over; any other file that is not CSV or Parquet is an error,
    so a stray file cannot silently change the number of clients. Every file must have
    the same columns; a different order is fine and is put in the first file's order.
    """
    path = Path(path)
    if not path.is_dir():
        what = "not a folder" if path.exists() else "no such folder"
        raise DataError(f"{path}: {what}; expected a folder with one CSV or Parquet file "
                        "per client (data.path)")
    entries = sorted((p for p in path.iterdir() if not p.name.startswith(".")),
                     key=lambda p: _natural_key(p.name))
    strays = [p.name for p in entries if not (p.is_file() and _is_data_name(p.name))]
    if strays:
        raise DataError(f"{path}: {_listing(strays)}: not CSV or Parquet files; a data "
                        "folder holds one file per client and nothing else (data.path)")
    if not entries:
        raise DataError(f"{path}: no CSV or Parquet files in this folder (data.path)")
    tables = [read_table(p, label=label, bad_lines=bad_lines) for p in entries]
    first = list(tables[0].frame.columns)
    aligned = [tables[0]]
    for table in tables[1:]:
        _check_same_columns(tables[0], table)
        if list(table.frame.columns) != first:
            table = dataclasses.replace(table, frame=table.frame[first])
        aligned.append(table)
    return aligned


def from_frame(frame: pd.DataFrame, *, label: str | None, where: str) -> RawTable:
    """A DataFrame a user's loader returned, every cell as text, as if read from a CSV file
    that pandas wrote (`frame.to_csv(index=False)`): numbers as Python writes them (39,
    39.5), missing cells (None, NaN, NA, NaT) empty. `where` names the source in messages
    (`where, row 17`). Raises DataError: no rows, a column without a name or named twice, no
    label column (data.label)."""
    names = [str(name).strip() for name in frame.columns]
    path = Path(where)
    _check_header(path, names, where)
    _check_label(path, label, names)
    if len(frame) == 0:
        raise DataError(f"{where}: no data rows")

    def text(value: Any) -> str:
        try:
            if pd.isna(value):
                return ""
        except (TypeError, ValueError):  # a list or array in a cell: pd.isna is not a bool
            pass
        return str(value)

    columns = {name: [text(v) for v in frame.iloc[:, i].astype(object).to_numpy()]
               for i, name in enumerate(names)}
    return RawTable(pd.DataFrame(columns, columns=names, dtype=str),
                    np.arange(1, len(frame) + 1, dtype=np.int64), path, (), unit="row")


def _read_text(path: Path, head: bytes, label: str | None, bad_lines: str,
               header: tuple[str, ...] = (), comment: str = "",
               named: str = " (data.path)") -> RawTable:
    raw = path.read_bytes()
    if head[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: not a readable gzip file ({e})") from None
    elif head[:4] == b"PK\x03\x04":
        raise DataError(f"{path}: a zip archive (an Excel workbook?); export it as CSV "
                        "or Parquet")
    if raw.startswith(codecs.BOM_UTF8):  # spreadsheet programs write one
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}, line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); "
                        "save the file as UTF-8") from None
    nul = text.find("\x00")
    if nul >= 0:  # Python's csv module accepts NUL; it means a binary file here
        raise DataError(f"{path}, line {text.count(chr(10), 0, nul) + 1}: a NUL byte; "
                        f"a binary file? expected CSV text or Parquet{named}")
    tsv = any(s == ".tsv" for s in (s.lower() for s in path.suffixes))
    sample = text if not comment else "".join(
        line for line in text[:_SNIFF_CHARS].splitlines(keepends=True)
        if not line.startswith(comment))
    delimiter = "\t" if tsv else _sniff(sample)
    # skipinitialspace: `a, "b, c"` is two fields, as a person writing ", " means it.
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True,
                        skipinitialspace=True)
    names: list[str] | None = list(header) if header else None
    rows: list[list[str]] = []
    lines: list[int] = []
    bad: list[tuple[int, int, int]] = []  # (first line, last line, fields)
    start = 1
    while True:
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(_quoting_error(path, start, reader.line_num, e)) from None
        first, last, start = start, reader.line_num, reader.line_num + 1
        if not record or (len(record) == 1 and not record[0].strip()):
            continue  # blank line
        if comment and record[0].startswith(comment):
            continue
        if names is None:
            names = [name.strip() for name in record]
            _check_header(path, names, f"{path}, line {first}")
            _check_label(path, label, names)
            continue
        if len(record) != len(names):
            bad.append((first, last, len(record)))
            continue
        rows.append(record)
        lines.append(first)
    if bad and bad_lines == "error":
        raise DataError(_bad_lines_error(path, bad, len(names or ())))
    if not rows:
        raise DataError(f"{path}: no data rows")
    assert names is not None
    frame = pd.DataFrame(rows, columns=names, dtype=str)
    skipped = tuple(n for first, last, _ in bad for n in range(first, last + 1))
    return RawTable(frame, np.asarray(lines, dtype=np.int64), path, skipped,
                    delimiter=delimiter)


def _sniff(text: str) -> str:
    """The delimiter that splits the header into most fields, the rows consistently."""
    sample = text[:_SNIFF_CHARS]
    if len(text) > _SNIFF_CHARS and "\n" in sample:
        sample = sample[:sample.rindex("\n")]  # no half line at the end
    best: tuple[float, int, str] = (-1.0, 0, ",")
    for delimiter in DELIMITERS:
        reader = csv.reader(io.StringIO(sample, newline=""), delimiter=delimiter,
                            skipinitialspace=True)
        try:
            rows = [r for r in reader if any(c.strip() for c in r)][:50]
        except csv.Error:
            continue
        if not rows or len(rows[0]) < 2:
            continue
        width, body = len(rows[0]), rows[1:]
        share = sum(len(r) == width for r in body) / len(body) if body else 1.0
        if (share, width) > best[:2]:
            best = (share, width, delimiter)
    return best[2]


def _quoting_error(path: Path, first: int, last: int, error: csv.Error) -> str:
    text = str(error)
    if "end of data" in text or "field limit" in text:
        return (f"{path}, line {first}: a quoted field opens here and never closes "
                "(an unmatched \"); a \" inside a quoted field must be doubled (\"\")")
    if "expected after" in text:
        return (f"{path}, line {last}: malformed quoting: text after a closing quote; "
                "a \" inside a quoted field must be doubled (\"\")")
    return f"{path}, line {last}: malformed CSV ({text})"


def _bad_lines_error(path: Path, bad: list[tuple[int, int, int]], width: int) -> str:
    first, last, fields = bad[0]
    where = f"line {first}" if first == last else f"lines {first}-{last}"
    message = f"{path}, {where}: {fields} fields, expected {width} (from the header)"
    if first != last:
        message += " (a quoted field spans these lines: an unmatched \"?)"
    if len(bad) > 1:
        message += f"; {len(bad)} such lines in all: " + _listing([b[0] for b in bad])
    return message + "; fix them or set data.bad-lines = \"skip\" to skip them"


def _read_parquet(path: Path, label: str | None) -> RawTable:
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: Parquet needs pyarrow: pip install 'privet[parquet]'"
                        ) from None
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    names = [str(name).strip() for name in table.column_names]
    _check_header(path, names, str(path))
    _check_label(path, label, names)
    if table.num_rows == 0:
        raise DataError(f"{path}: no data rows")
    columns: dict[str, list[str]] = {}
    for name, column in zip(names, table.columns):
        kind = column.type
        if pa.types.is_floating(kind):  # NaN is missing, not the text "nan"
            column = pc.if_else(pc.is_nan(column), pa.scalar(None, kind), column)
        try:
            text = pc.cast(column, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise DataError(f"{path}: column {name!r} holds {kind}; expected numbers or "
                            "text in each cell") from None
        columns[name] = pc.fill_null(text, "").to_pylist()  # null = missing = ""
    frame = pd.DataFrame(columns, columns=names, dtype=str)
    return RawTable(frame, np.arange(1, table.num_rows + 1, dtype=np.int64), path, (),
                    unit="row")


def _check_header(path: Path, names: list[str], where: str) -> None:
    unnamed = [str(i + 1) for i, name in enumerate(names) if not name]
    if unnamed:
        raise DataError(f"{where}: column {', '.join(unnamed)} of the header has no name; "
                        "name it, or drop it (a pandas row index? write with index=False)")
    counts = Counter(names)
    duplicates = [f"{name!r} (columns "
                  + ", ".join(str(i + 1) for i, n in enumerate(names) if n == name) + ")"
                  for name, count in counts.items() if count > 1]
    if duplicates:
        raise DataError(f"{where}: duplicate column name(s) in the header: "
                        + "; ".join(duplicates) + "; column names must be unique")


def _check_label(path: Path, label: str | None, names: list[str]) -> None:
    if label is None or label in names:  # None: no label needed (scoring new rows)
        return
    columns = _listing(names, shown=20, quote=False)
    if not label:
        raise DataError(f"{path}: data.label is not set; columns are: {columns}")
    message = f"{path}: label column {label!r} not found; columns are: {columns} (data.label)"
    near = [n for n in names if n.lower() == label.lower()] or \
        difflib.get_close_matches(label, names, n=1)
    if near:
        message += f"; did you mean {near[0]!r}?"
    if sum(_is_number(n) for n in names) * 2 >= len(names):
        message += "; the first line looks like data: the file needs a header line"
    raise DataError(message)


def _check_same_columns(reference: RawTable, table: RawTable) -> None:
    want, have = list(reference.frame.columns), list(table.frame.columns)
    if set(want) == set(have):
        return
    parts = []
    missing = [c for c in want if c not in have]
    extra = [c for c in have if c not in want]
    if missing:
        parts.append("missing " + _listing(missing))
    if extra:
        parts.append("extra " + _listing(extra))
    raise DataError(f"{table.path}: columns differ from {reference.path.name}: "
                    + "; ".join(parts) + " (every client file needs the same columns)")


# --- schema -----------------------------------------------------------------------------


def infer_schema(tables: list[RawTable], *, label: str, column_types: dict[str, str],
                 categories: dict[str, list[str]], classes: list[str],
                 missing_markers: list[str], max_vocabulary: int = 1000,
                 number_format: NumberFormat | None = None, regression: bool = False
                 ) -> TableSchema:
    """Column types, vocabularies and classes: the settings where given, else from `tables`.

    A column is numeric when at least 95% of its present cells (stripped; missing = ""
    or a marker) parse as numbers, written plainly or in one locale's format
    (`numbers.infer_format`; `number_format` declares one for every column), else
    categorical; a column with no value at all is ignored. A column that falls back to
    categorical although many of its cells are numbers, or dates, is described in
    `fallbacks`. Vocabularies and classes found here come from the rows in `tables`: give
    data.categories and data.classes to keep them from depending on anyone's data.

    With `regression` the label is a number: no classes (`classes` is ()), and its number
    format is found like a numeric column's (kept in `formats` under the label's name);
    raises DataError when fewer than 95% of its present cells are numbers.
    """
    if not tables:
        raise ValueError("infer_schema needs at least one table")
    first = tables[0]
    columns = list(first.frame.columns)
    for table in tables[1:]:
        _check_same_columns(first, table)
    _check_label(first.path, label, columns)
    markers = list(missing_markers)
    types = _check_types(column_types or {}, columns, label, first.path)
    given = _check_categories(categories or {}, columns, label, types, first.path)
    where = _where(tables)
    numeric: list[str] = []
    vocabularies: dict[str, tuple[str, ...]] = {}
    ignored: list[str] = []
    formats: dict[str, NumberFormat] = {}
    fallbacks: list[str] = []
    delimiter = first.delimiter
    for column in columns:
        if column == label:
            continue
        kind = types.get(column) or ("categorical" if column in given else None)
        if kind == "ignore":
            ignored.append(column)
            continue
        if column in given:
            vocabularies[column] = given[column]
            continue
        counts = _value_counts(tables, column, markers)
        fmt, share = infer_format(counts, delimiter, NUMERIC_SHARE, number_format)
        if kind is None:
            if not len(counts):
                ignored.append(column)
                continue
            kind = "numeric" if share >= NUMERIC_SHARE else "categorical"
            if kind == "categorical":
                fallbacks += _fallback(tables, column, counts, share, fmt, markers)
        if kind == "numeric":
            numeric.append(column)
            if not fmt.plain:
                formats[column] = fmt
            continue
        vocabulary = sorted(counts.index.tolist())
        if len(vocabulary) > max_vocabulary:
            key = _toml_key(column)
            raise DataError(
                f"{where}: column {column!r} has {len(vocabulary)} distinct values, more "
                f"than {max_vocabulary} for a category (an identifier or free text?); set "
                f"data.column-types = {{ {key} = \"ignore\" }} (or \"numeric\")")
        vocabularies[column] = tuple(vocabulary)
    if regression:
        found: tuple[str, ...] = ()
        fmt = _label_format(tables, label, markers, delimiter, number_format, where)
        if not fmt.plain:
            formats[label] = fmt
    else:
        found = _classes(tables, label, classes, markers, max_vocabulary, where)
        fallbacks += _label_notes(tables, label, markers, where)
    return TableSchema(tuple(numeric), vocabularies, label, found, tuple(ignored), formats,
                       tuple(fallbacks))


FALLBACK_SHARE = 0.5  # a categorical column with at least this share of numbers is reported
_DATE_LIKE = re.compile(r"^\d{4}-\d{1,2}-\d{1,2}([ T]\d{1,2}:\d{2}(:\d{2}(\.\d+)?)?)?"
                        r"(Z|[+-]\d{2}:?\d{2})?$|^\d{1,2}[./]\d{1,2}[./]\d{2,4}"
                        r"( \d{1,2}:\d{2}(:\d{2})?)?$")


def _fallback(tables: list[RawTable], column: str, counts: pd.Series, share: float,
              fmt: NumberFormat, markers: list[str]) -> list[str]:
    """A line for a column that became categorical though its cells look like numbers (a
    share of them) or dates: what was found, examples of the cells that are not numbers,
    and the setting that changes it."""
    key = _toml_key(column)
    dates = counts.index.to_series().astype(str).str.match(_DATE_LIKE)
    date_share = float(counts.to_numpy()[dates.to_numpy()].sum() / counts.sum())
    if date_share >= NUMERIC_SHARE:
        return [f"{_where(tables)}: column {column!r} looks like dates or times (e.g. "
                f"{_show(str(counts.index[0]))}): treated as categorical with {len(counts)} "
                f"value(s); privet does not read dates: set data.column-types = "
                f"{{ {key} = \"ignore\" }} or write it as a number"]
    if share < FALLBACK_SHARE:
        return []
    bad = []
    for table in tables:
        values = _stripped(table.frame[column])
        present = ~_missing(values, markers)
        wrong = np.flatnonzero(present & fmt.parse(values).isna().to_numpy())
        bad += [(table, int(table.lines[i]), str(values.iloc[i])) for i in wrong[:3]]
        if len(bad) >= 3:
            break
    examples = ", ".join(f"{t.path.name} {t.unit} {line}: {_show(v)}" for t, line, v in bad[:3])
    written = "" if fmt.plain else f" ({fmt.describe()})"
    return [f"{_where(tables)}: column {column!r} treated as categorical ({len(counts)} "
            f"value(s)): {math.floor(share * 1000) / 10:g}% of its cells are numbers{written}, "
            f"{NUMERIC_SHARE:.0%} "
            f"needed; not numbers: {examples}; set data.column-types = {{ {key} = "
            f"\"numeric\" }} to read it as numbers (the others then count as missing)"]


def _check_types(column_types: Any, columns: list[str], label: str,
                 path: Path) -> dict[str, str]:
    if not isinstance(column_types, dict):
        raise DataError("data.column-types: expected a table such as { zip = \"categorical\" }")
    for column, kind in column_types.items():
        _check_column("data.column-types", column, columns, path)
        if kind not in COLUMN_TYPES:
            raise DataError(f"data.column-types: {column!r} = {kind!r}: expected one of "
                            + ", ".join(COLUMN_TYPES))
        if column == label and kind != "categorical":
            raise DataError(f"data.column-types: {column!r} is the label column (data.label); "
                            f"it cannot be {kind}")
    return dict(column_types)


def _check_categories(categories: Any, columns: list[str], label: str,
                      types: dict[str, str], path: Path) -> dict[str, tuple[str, ...]]:
    if not isinstance(categories, dict):
        raise DataError("data.categories: expected a table such as "
                        "{ colour = [\"red\", \"blue\"] }")
    out: dict[str, tuple[str, ...]] = {}
    for column, values in categories.items():
        _check_column("data.categories", column, columns, path)
        if column == label:
            raise DataError(f"data.categories: {column!r} is the label column; give its "
                            "values in data.classes")
        if types.get(column, "categorical") != "categorical":
            raise DataError(f"data.categories: {column!r} has a vocabulary but "
                            f"data.column-types makes it {types[column]}")
        out[column] = _text_list(values, f"data.categories: {column!r}")
    return out


def _check_column(setting: str, column: str, columns: list[str], path: Path) -> None:
    if column in columns:
        return
    message = (f"{setting}: column {column!r} is not in {path}; columns are: "
               + _listing(columns, shown=20, quote=False))
    near = difflib.get_close_matches(column, columns, n=1)
    if near:
        message += f"; did you mean {near[0]!r}?"
    raise DataError(message)


def _text_list(values: Any, setting: str) -> tuple[str, ...]:
    """Setting values as cells read: text, stripped; whole numbers written as numbers."""
    if not isinstance(values, (list, tuple)):
        raise DataError(f"{setting}: expected a list of values, got {values!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(f"{setting}: {value!r} is not text; write values as in the file, "
                            "in quotes")
        out.append(str(value).strip())
    twice = sorted(v for v, n in Counter(out).items() if n > 1)
    if twice:
        raise DataError(f"{setting}: {_listing(twice)} listed more than once")
    return tuple(out)


def normalise_label(text: Any) -> str:
    """A label as privet compares it, in class inference and encoding alike: trimmed,
    trailing dots dropped (Adult's test file writes ">50K."), and a number written one way
    ("0.0", "1.00", "+1" are "0", "1", "1"; "0.50" is "0.5")."""
    value = str(text).strip().rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return value
    if not np.isfinite(number):
        return value
    return str(int(number)) if number.is_integer() else repr(number)


def _normalised(values: pd.Series) -> pd.Series:
    return values.map(normalise_label, na_action="ignore")


def _label_notes(tables: list[RawTable], label: str, markers: list[str], where: str
                 ) -> list[str]:
    """Warnings about labels written more than one way: the same class written differently
    (merged: "0" and "0.0"), and classes that differ only by case or spacing (kept apart)."""
    counts = _value_counts(tables, label, markers)
    spellings: dict[str, list[str]] = {}
    for raw in counts.index:
        spellings.setdefault(normalise_label(raw), []).append(str(raw))
    notes = []
    merged = {k: sorted(v) for k, v in spellings.items() if len(v) > 1}
    if merged:
        shown = "; ".join(f"{_listing(v)} as {k!r}" for k, v in list(merged.items())[:3])
        notes.append(f"{where}: label column {label!r}: the same class written differently, "
                     f"read as one: {shown}")
    folded: dict[str, list[str]] = {}
    for value in spellings:
        folded.setdefault(" ".join(value.casefold().split()), []).append(value)
    alike = [sorted(v) for v in folded.values() if len(v) > 1]
    if alike:
        notes.append(f"{where}: label column {label!r}: classes that differ only by case or "
                     f"spacing: {'; '.join(_listing(v) for v in alike[:3])}; they are "
                     "different classes: write each one way, or list data.classes")
    return notes


def _label_format(tables: list[RawTable], label: str, markers: list[str], delimiter: str,
                  number_format: NumberFormat | None, where: str) -> NumberFormat:
    """A regression label's number format; DataError unless (nearly) all of it is numbers."""
    counts = _value_counts(tables, label, markers)
    if not len(counts):
        raise DataError(f"{where}: label column {label!r} has no value (data.label)")
    fmt, share = infer_format(counts, delimiter, NUMERIC_SHARE, number_format)
    if share < NUMERIC_SHARE:
        raise DataError(f"{where}: label column {label!r}: {share:.0%} of its values are "
                        "numbers; train.task = \"regression\" needs a numeric data.label")
    return fmt


def _classes(tables: list[RawTable], label: str, classes: Any, markers: list[str],
             max_vocabulary: int, where: str) -> tuple[str, ...]:
    if classes:
        given = tuple(normalise_label(c) for c in _text_list(classes, "data.classes"))
        if len(set(given)) < len(given):
            raise DataError(f"data.classes = {list(classes)}: the same class twice, written "
                            "differently")
        if len(given) < 2:
            raise DataError(f"data.classes = {list(given)}: a classifier needs at least 2 "
                            "classes")
        for table in tables:
            values = _stripped(table.frame[label])
            present = ~_missing(values, markers)
            unknown = present & ~_normalised(values).isin(given).to_numpy()
            if unknown.any():
                rows = np.flatnonzero(unknown)
                seen = list(dict.fromkeys(values.iloc[rows].tolist()))
                message = (f"{table.at(int(table.lines[rows[0]]))}: label "
                           f"{_show(values.iloc[rows[0]])} is not one of {list(given)} "
                           "(data.classes)")
                if len(rows) > 1:
                    message += (f"; {len(rows)} such rows in this file, values: "
                                + _listing(seen))
                raise DataError(message)
        return given
    found = sorted({normalise_label(v) for v in _value_counts(tables, label, markers).index})
    if all(_is_number(v) for v in found):  # "2" before "10"
        found.sort(key=float)
    if len(found) > max_vocabulary:
        raise DataError(f"{where}: label column {label!r} has {len(found)} distinct values; "
                        "privet trains classifiers: is data.label the right column?")
    if len(found) < 2:
        raise DataError(f"{where}: label column {label!r} has {len(found)} class(es)"
                        + (f" ({_listing(found)})" if found else "")
                        + "; a classifier needs at least 2 (data.label)")
    return tuple(found)


# --- numbers ----------------------------------------------------------------------------


def check_numeric(table: RawTable, numeric: Iterable[str], missing_markers: list[str],
                  formats: dict[str, NumberFormat] | None = None
                  ) -> dict[str, dict[str, list[tuple[int, str]]]]:
    """The cells of numeric columns that are not finite numbers, by kind:
    {column: {"non-numeric": [(line, value), ...], "non-finite": [...]}}.

    The same test `preprocess.clean` applies (stripped, missing = "" or a marker, parsed
    in the column's format; inf, -inf, 1e309 and nan are not finite), so these are exactly
    the cells it turns into missing values.
    """
    markers = list(missing_markers)
    out: dict[str, dict[str, list[tuple[int, str]]]] = {}
    for column in numeric:
        if column not in table.frame.columns:
            raise DataError(f"{table.path}: numeric column {column!r} not found")
        values = _stripped(table.frame[column])
        missing = _missing(values, markers)
        text_nan = values.str.lower().isin(["nan", "+nan", "-nan"]).fillna(False).to_numpy()
        parsed = (formats or {}).get(column, PLAIN).parse(values.mask(missing)).to_numpy()
        found = {"non-numeric": np.flatnonzero(np.isnan(parsed) & ~missing & ~text_nan),
                 "non-finite": np.flatnonzero((np.isinf(parsed) | text_nan) & ~missing)}
        cells = {kind: [(int(table.lines[i]), str(values.iloc[i])) for i in rows]
                 for kind, rows in found.items() if len(rows)}
        if cells:
            out[column] = cells
    return out


def describe_bad_numbers(table: RawTable, bad: dict[str, dict[str, list[tuple[int, str]]]]
                         ) -> str:
    """One warning line per column and kind, e.g. "adult.csv: column 'age': 3 non-numeric
    value(s), e.g. line 12: 'abc'; treated as missing"; "" when there is nothing to say."""
    out = []
    for column, kinds in bad.items():
        for kind, cells in kinds.items():
            examples = ", ".join(f"{table.unit} {line}: {_show(value)}"
                                 for line, value in cells[:3])
            out.append(f"{table.path.name}: column {column!r}: {len(cells)} {kind} "
                       f"value(s), e.g. {examples}; treated as missing")
    return "\n".join(out)


# --- helpers ----------------------------------------------------------------------------


def _stripped(column: pd.Series) -> pd.Series:
    return column.astype("string").str.strip()


def _missing(values: pd.Series, markers: list[str]) -> np.ndarray:
    """Missing as `preprocess.clean` sees it: empty or a marker, after stripping."""
    mask = values.isna() | values.isin(markers) | (values == "")
    return mask.fillna(True).to_numpy(dtype=bool)


def _value_counts(tables: list[RawTable], column: str, markers: list[str]) -> pd.Series:
    """How often each present (stripped, not missing) value occurs: distinct values are
    few next to rows, and parsing each once keeps inference fast."""
    parts = []
    for table in tables:
        values = _stripped(table.frame[column])
        parts.append(values[~_missing(values, markers)])
    return pd.concat(parts).value_counts(sort=False)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_data_name(name: str) -> bool:
    name = name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    return name.endswith(TEXT_SUFFIXES + PARQUET_SUFFIXES)


def _natural_key(name: str) -> list[Any]:
    # Splitting on digit runs alternates text and number, so keys compare position-wise.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name.lower())]


def _where(tables: list[RawTable]) -> str:
    if len(tables) == 1:
        return str(tables[0].path)
    return f"{tables[0].path.parent} ({len(tables)} files)"


def _show(value: str) -> str:
    return repr(value if len(value) <= 40 else value[:37] + "...")


def _listing(items: list[Any], shown: int = _SHOWN, quote: bool = True) -> str:
    text = [repr(i) if quote and isinstance(i, str) else str(i) for i in items[:shown]]
    if len(items) > shown:
        text.append(f"... ({len(items)} in all)")
    return ", ".join(text)


def _toml_key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
