"""`privet ledger DIR`: what a ledger folder holds, per data source and over every run; and
the one explicit way to forget spend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from privet.experiments.cli_common import console, fail


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
    forget_orphans: Annotated[bool, typer.Option(
        "--forget-orphans", help="delete row sets whose records were deleted (their spend "
                                 "is forgotten); with --yes")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="confirm --forget / --forget-orphans")
                   ] = False,
) -> None:
    """List the privacy spend kept in a ledger folder, per data source, over every run.

    Examples:

      privet ledger ledgers/                      # privacy.ledger-dir of simulations

      privet ledger /data                         # a node's ledger, next to its data file

      privet ledger ledgers/ --forget 3f2a9c0d41b7e8aa --yes   # forget one run's spend
    """
    from privet.common.privacy.ledger import LEDGER_FOLDER, LedgerDir, LedgerError
    from privet.common.privacy.ledger_report import spend_by_source

    if directory.name == "user-level" and directory.parent.name == LEDGER_FOLDER:
        directory = directory.parent  # both levels are listed from the ledger folder
    root = directory if directory.name == LEDGER_FOLDER else directory / LEDGER_FOLDER
    if not directory.exists():
        fail(f"{directory}: no such folder")
    if not directory.is_dir():
        fail(f"{directory}: a file, not a folder; give the folder holding "
             f"{LEDGER_FOLDER}/ (privacy.ledger-dir, or a node's data folder)")
    if forget or forget_orphans:
        _forget(directory, forget or [], yes, forget_orphans)
        return
    try:
        sample = spend_by_source(directory, delta, accountant)
        user = spend_by_source(directory, delta, accountant, part="user-level")
    except LedgerError as error:
        fail(str(error))
    except ValueError as error:
        fail(f"{directory}: {error}")
    if as_json or not (sample or user):
        if not as_json:
            console.print(f"{root}: no privacy spend recorded"
                          + ("" if root.is_dir() else " (no ledger folder here)"))
            return
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
        for column in ("source", unit, "max ε", f"{unit} at max", "spent on", "runs"):
            table.add_column(column, justify="left" if column in ("source", "spent on", "runs")
                             else "right", overflow="fold")  # paths whole, never cut
        for s in entries:
            runs = ", ".join(s.runs[:3]) + (f" … ({len(s.runs)})" if len(s.runs) > 3 else "")
            table.add_row(s.source, "all" if s.rows is None else str(s.rows),
                          f"{s.epsilon:.4f}",
                          "all" if s.rows_at_max is None else str(s.rows_at_max),
                          ", ".join(s.spent_on), runs)
        console.print(table)
    console.print("max ε composes every run in this folder that touched those rows; "
                  "`--json` lists each source's records (what --forget takes)")


def _forget(directory: Path, ids: list[str], yes: bool, orphans: bool) -> None:
    """Delete the named records (a run id names all of its records), or the row sets no
    record names, from the folder and its copy. Anything else is refused in one line."""
    from privet.common.privacy.ledger import LedgerDir, LedgerError

    for part in ("", "user-level"):
        store = LedgerDir(directory, part=part)
        if orphans and not ids:
            if not yes:
                fail(f"would forget the row sets no record names in {store.root}; their spend "
                     "is then lost for good; add --yes")
            for rowset in store.forget_orphans():
                console.print(f"forgot row set {rowset} in {store.root} and its copy")
            continue
        try:
            known = {r.id: r for r in store.records()}
        except LedgerError:  # a damaged record is forgotten by its file name
            known = {p.stem: None for p in (store.root / "spend").glob("*.json")}
        chosen = [i for i, r in known.items() if i in ids or (r is not None and r.run in ids)]
        if not chosen:
            continue
        if not yes:
            fail(f"would forget {len(chosen)} record(s) in {store.root}: {', '.join(chosen)}; "
                 "their spend is then lost for good; add --yes")
        store.forget(chosen)
        ids = [i for i in ids if i not in chosen and not any(
            known[c] is not None and known[c].run == i for c in chosen)]
        for record_id in chosen:
            what = known[record_id].source if known[record_id] else "an unreadable record"
            console.print(f"forgot {record_id} ({what}) in {store.root} and its copy")
    if ids:
        fail(f"{directory}: no record or run {', '.join(ids)} in this ledger; "
             "`privet ledger DIR --json` lists them")
