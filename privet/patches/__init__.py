"""Every patch privet makes to another library's private internals, one module per library.

privet runs on the stock libraries; these patches only make it faster (dp-accounting's PLD
queries, Flower's simulation polling, a process pool where Flower would start Ray) or keep a
seeded simulation's client sampling the same from run to run (Flower's random node ids).
Each library's module:

- names the versions its patches were written against and refuses any other with one line
  (`PatchError`), since a private function may change in any release;
- is installed explicitly, by privet's entry points (the CLI, the ServerApp, the ClientApp,
  the simulation driver), never on import: importing privet in a notebook leaves Flower and
  dp-accounting as they are.

`PRIVET_STOCK_LIBRARIES=1` installs nothing: the same experiment runs on the libraries as
released (slower; on one machine Flower's own Ray backend runs the clients; client sampling
then follows Flower's random node ids, so a seeded run samples the same clients from run to
run only when every client takes part in every round). CI runs the tiny experiment both ways
and checks that ε and the model are the same (tests/test_patches.py).
"""

from __future__ import annotations

import importlib
import os

STOCK_ENV = "PRIVET_STOCK_LIBRARIES"
LIBRARIES = {"flwr": "privet.patches.flower", "dp-accounting": "privet.patches.dp_accounting"}


class PatchError(RuntimeError):
    """The installed library is not a version privet's patches were written against."""


def stock() -> bool:
    """Whether this process runs on the stock libraries (PRIVET_STOCK_LIBRARIES set, not 0)."""
    return os.environ.get(STOCK_ENV, "").strip() not in ("", "0")


def install(*libraries: str) -> tuple[str, ...]:
    """Install the patches of `libraries` (names as in LIBRARIES; default: all) unless
    running stock; idempotent. Returns the libraries now patched in this process.
    Raises PatchError where an installed version differs from the one a patch was
    written against, KeyError for an unknown library name."""
    if not stock():
        for name in libraries or tuple(LIBRARIES):
            importlib.import_module(LIBRARIES[name]).install()
    return installed()


def installed() -> tuple[str, ...]:
    """The libraries whose patches this process has installed (for summary.json)."""
    import sys

    return tuple(name for name, module in LIBRARIES.items()
                 if getattr(sys.modules.get(module), "INSTALLED", False))


def check_version(library: str, installed_version: str, written_for: tuple[str, ...]) -> None:
    """Raise PatchError unless `installed_version` starts with one of `written_for`."""
    if not installed_version.startswith(written_for):
        raise PatchError(
            f"{library} {installed_version} is not a version privet's patches of its internals "
            f"were written for ({', '.join(v + 'x' for v in written_for)}): install one, or "
            f"set {STOCK_ENV}=1 to run on the stock library (slower)")
