"""What a ledger folder says: spend per data source over every run (`privet ledger DIR`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from privet.common.privacy import accountants
from privet.common.privacy.ledger import LedgerDir, SpendRecord, history_of, row_groups


@dataclass
class SourceSpend:
    """One data source's spend: `rows` it names (None: a record covers all rows, as older
    ledgers do), the runs and records, and the ε of its most spent rows."""
    source: str
    records: list[SpendRecord] = field(default_factory=list)
    rows: int | None = 0
    epsilon: float = 0.0
    rows_at_max: int | None = 0
    spent_on: dict[str, int] = field(default_factory=dict)  # purpose -> steps

    @property
    def runs(self) -> list[str]:
        return sorted({r.run for r in self.records})

    def as_dict(self) -> dict:
        return {"source": self.source, "rows": self.rows, "runs": self.runs,
                "records": [r.id for r in self.records], "max_epsilon": self.epsilon,
                "rows_at_max_epsilon": self.rows_at_max, "steps_by_purpose": self.spent_on,
                "noise_sources": sorted({r.noise_source for r in self.records})}


def _worst(store: LedgerDir, rows: np.ndarray | None, records: list[SpendRecord],
           delta: float, accountant: str) -> tuple[float, int | None]:
    """(ε of the most spent of `rows`, how many rows reach it) composing every record in
    `records` that touches them; `rows` None: a record covers all rows (count unknown)."""
    if rows is None:
        history = history_of(s for r in records for s in r.spends)
        return accountants.epsilon(history, delta, accountant), None
    best, at = 0.0, 0
    for touched, count in row_groups(rows, [store.rows(r.rows) for r in records]):
        history = history_of(s for r, on in zip(records, touched) if on for s in r.spends)
        eps = accountants.epsilon(history, delta, accountant)
        if eps > best + 1e-12:
            best, at = eps, count
        elif abs(eps - best) <= 1e-12:
            at += count
    return best, at


def spend_by_source(directory, delta: float = 1e-5, accountant: str = "pld",
                    part: str = "") -> list[SourceSpend]:
    """Every data source a ledger folder (`part` "user-level": the server's) holds spend on;
    each source's ε composes every record of the folder that touched its rows, whatever
    source that record names (a row split into another file, or appended to one, keeps its
    spend). Raises LedgerError when the folder cannot be trusted."""
    store = LedgerDir(directory, part=part)
    records = store.records()
    by_source: dict[str, SourceSpend] = {}
    for record in records:
        entry = by_source.setdefault(record.source, SourceSpend(record.source))
        entry.records.append(record)
        for spend in record.spends:
            entry.spent_on[spend.purpose] = entry.spent_on.get(spend.purpose, 0) + spend.steps
    for entry in by_source.values():
        sets = [store.rows(r.rows) for r in entry.records]
        rows = None if any(s is None for s in sets) else np.unique(np.concatenate(sets))
        entry.epsilon, entry.rows_at_max = _worst(store, rows, records, delta, accountant)
        entry.rows = None if rows is None else len(rows)
    return sorted(by_source.values(), key=lambda e: e.source)
