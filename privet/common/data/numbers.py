"""How the numbers in a column are written: the decimal mark and the thousands separator.

Spreadsheet exports write numbers the way their locale does: `1,234.5` (thousands
separator), `25,165` in a `;`-separated file (decimal comma), `1.234,5`, `1 234,5`,
`1'234.5`. Python and pandas read none of them as numbers, and a numeric column would
silently become a category with as many values as rows. `infer_format` picks, per column,
the format under which (nearly) every present cell is a number; `NumberFormat.parse` reads
the cells with it. `data.decimal` / `data.thousands` settle a file where that is ambiguous.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

DECIMAL_MARKS = (".", ",")
THOUSANDS_SEPARATORS = ("", ",", ".", " ", "'")


@dataclass(frozen=True)
class NumberFormat:
    """`decimal` mark and `thousands` separator ("" = none) of a column's numbers."""
    decimal: str = "."
    thousands: str = ""

    @property
    def plain(self) -> bool:
        return self.decimal == "." and not self.thousands

    def describe(self) -> str:
        sep = {"": "no", ",": "',' as", ".": "'.' as", " ": "space as", "'": "\"'\" as"}
        return f"{sep[self.thousands]} thousands separator, '{self.decimal}' as decimal mark"

    def _pattern(self) -> re.Pattern:
        t, d = re.escape(self.thousands), re.escape(self.decimal)
        whole = rf"(?:\d{{1,3}}(?:{t}\d{{3}})+|\d+)" if self.thousands else r"\d+"
        return re.compile(rf"^[+-]?{whole}(?:{d}\d*)?$|^[+-]?{d}\d+$")

    def parse(self, values: pd.Series) -> pd.Series:
        """float64 per cell (cells already stripped; missing ones NaN); NaN where a cell
        is not a number in this format. Plain numbers accept what pandas accepts
        (exponents, inf, nan); the others only digits with this format's marks."""
        if self.plain:
            return pd.to_numeric(values, errors="coerce").astype(float)
        text = values.astype("string")
        ok = text.str.match(self._pattern()).fillna(False).to_numpy(dtype=bool)
        out = np.full(len(text), np.nan)
        if ok.any():
            chosen = text[ok]
            if self.thousands:
                chosen = chosen.str.replace(self.thousands, "", regex=False)
            out[ok] = pd.to_numeric(chosen.str.replace(self.decimal, ".", regex=False),
                                    errors="coerce").to_numpy(dtype=float)
        return pd.Series(out, index=values.index)


PLAIN = NumberFormat()
_CANDIDATES = tuple(NumberFormat(d, t) for d in DECIMAL_MARKS for t in THOUSANDS_SEPARATORS
                    if d != t)


def share_parsed(counts: pd.Series, fmt: NumberFormat) -> float:
    """Share of present cells (`counts`: how often each distinct value occurs) that parse."""
    if not counts.sum():
        return 0.0
    parsed = fmt.parse(pd.Series(counts.index, dtype=object))
    return float(counts.to_numpy()[parsed.notna().to_numpy()].sum() / counts.sum())


def infer_format(counts: pd.Series, delimiter: str, threshold: float,
                 declared: NumberFormat | None = None) -> tuple[NumberFormat, float]:
    """The format a column's numbers are written in, and the share of its cells that parse
    with it. Plain numbers when they reach `threshold`; else the format that parses most
    cells. `1,234` is both 1234 and 1.234: a cell that settles it decides (`1,234.5`,
    `25,1`), else the file's separator does: a `,`-separated file cannot have written a
    decimal comma unquoted, so `,` is a thousands separator there and a decimal comma in
    a `;` or tab-separated file (how European spreadsheets export)."""
    if declared is not None:
        return declared, share_parsed(counts, declared)
    plain = share_parsed(counts, PLAIN)
    if plain >= threshold:
        return PLAIN, plain
    shares = {fmt: share_parsed(counts, fmt) for fmt in _CANDIDATES}
    best = max(shares.values())
    if best <= plain:
        return PLAIN, plain
    tied = [fmt for fmt, share in shares.items() if share == best]
    comma_decimal = delimiter not in (",", "")
    tied.sort(key=lambda f: (f.decimal != ("," if comma_decimal else "."),
                             THOUSANDS_SEPARATORS.index(f.thousands)))
    return tied[0], best
