"""What the `privet` commands share: consoles, the error exit, common options."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

# Markup off: what comes from data, files and configs ("[kg]", "[/quote]") prints as it is;
# the few styled lines say markup=True and escape what they embed.
console = Console(highlight=False, markup=False)
err = Console(stderr=True, highlight=False, markup=False)

# Options several commands share.
ConfigFile = Annotated[Path, typer.Option(
    "--config", "-c", help="experiment TOML file",
    show_default="the shipped experiments/configs/adult.toml")]
Overrides = Annotated[Optional[list[str]], typer.Option(
    "--set", "-s", help="override a key, e.g. --set privacy.epsilon=1 (repeatable)")]


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]privet: error:[/] {escape(message)}", markup=True, soft_wrap=True)
    raise typer.Exit(code)


def say(line: str) -> None:
    """Paths, commands and Flower's log lines verbatim: no rich markup, no wrapping."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def exit_now(code: int) -> None:
    """Leave now: every result is written and closed by the time this is called. Waiting
    would mean Flower's ServerApp thread, which may still be blocked after an error, and the
    interpreter's teardown, ~2 s of garbage collection over torch, pandas and Flower."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
