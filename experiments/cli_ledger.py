"""`privet ledger DIR`: what a ledger folder holds, per data source and over every run; and
the one explicit way to forget spend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from experiments.cli_common import console, fail


def ledger(
    directory: Annotated[Path, typer.Argument(
        help="a ledger folder: privacy.ledger-dir, a node's data folder or its ledger-dir")],
    delta: Annotated[float, typer.Option(min=0.0, max=0.1, help="δ the ε are reported at")
                     ] = 1e-5,
    accountant: Annotated[str, typer.Option(help="pld | prv | rdp")] = "pld",
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")
                       ] = False,
    forget: Annotated[Optional[list[str]], typer.Option(
        "--forget", help="a run id or record id whose spend to forget (repeatable); "
                         "with --yes")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="confirm --forget")] = False,
) -> None:
    """List the privacy spend kept in a ledger folder, per data source, over every run.

    Examples:

      privet ledger ledgers/                      # privacy.ledger-dir of simulations

      privet ledger /data                         # a node's ledger, next to its data file

      privet ledger ledgers/ --forget 3f2a9c0d41b7e8aa --yes   # forget one run's spend
    """
    from common.privacy.ledger import LEDGER_FOLDER, LedgerDir, LedgerError
    from common.privacy.ledger_report import spend_by_source

    root = directory if directory.name == LEDGER_FOLDER else directory / LEDGER_FOLDER
    if not directory.is_dir():
        fail(f"{directory}: not a folder")
    if forget:
        _forget(directory, forget, yes)
        return
    try:
        sample = spend_by_source(directory, delta, accountant)
        user = spend_by_source(directory, delta, accountant, part="user-level")
    except LedgerError as error:
        fail(str(error))
    except ValueError as error:
        fail(f"{directory}: {error}")
    if not sample and not user:
        console.print(f"{root}: no privacy spend recorded"
                      + ("" if root.is_dir() else " (no ledger folder here)"))
        return
    if as_json:
        console.print_json(json.dumps({"ledger": str(LedgerDir(directory).root),
                                       "delta": delta, "accountant": accountant,
                                       "sample_level": [s.as_dict() for s in sample],
                                       "user_level": [s.as_dict() for s in user]}))
        return
    for title, entries, unit in (("sample level", sample, "rows"),
                                 ("user level (participants)", user, "participants")):
        if not entries:
            continue
        table = Table(title=f"{root}: {title}, ε at δ = {delta:g} ({accountant})")
        for column in ("source", unit, "runs", "max ε", f"{unit} at max", "steps spent on"):
            table.add_column(column, justify="left" if column in ("source", "steps spent on")
                             else "right")
        for s in entries:
            table.add_row(escape(s.source), "all" if s.rows is None else str(s.rows),
                          str(len(s.runs)), f"{s.epsilon:.4f}",
                          "all" if s.rows_at_max is None else str(s.rows_at_max),
                          escape(", ".join(f"{k} {v}" for k, v in s.spent_on.items())))
        console.print(table)


def _forget(directory: Path, ids: list[str], yes: bool) -> None:
    from common.privacy.ledger import LedgerDir, LedgerError

    for part in ("", "user-level"):
        store = LedgerDir(directory, part=part)
        try:
            records = store.records()
        except LedgerError:  # forgetting is how a damaged record is cleared: list files
            records = None
        names = {r.id: r for r in records} if records is not None else None
        chosen = ([r.id for r in records if r.run in ids or r.id in ids]
                  if records is not None else [i for i in ids])
        if records is not None and not chosen:
            continue
        if not yes:
            fail(f"would forget {len(chosen)} record(s) in {store.root}: "
                 f"{', '.join(chosen)}; their spend is then lost for good; add --yes")
        store.forget(chosen)
        for record_id in chosen:
            what = names[record_id].source if names else "?"
            console.print(f"forgot {record_id} ({escape(what)}) in {store.root} and its copy")
