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
import importlib.abc
import importlib.metadata
import importlib.util
import os
import sys

STOCK_ENV = "PRIVET_STOCK_LIBRARIES"
LIBRARIES = {"flwr": "privet.patches.flower", "dp-accounting": "privet.patches.dp_accounting"}
# the releases each library's patches were written against (version prefixes)
WRITTEN_FOR = {"flwr": ("1.41.",), "dp-accounting": ("0.6.",)}


class PatchError(RuntimeError):
    """The installed library is not a version privet's patches were written against."""


def stock() -> bool:
    """Whether this process runs on the stock libraries (PRIVET_STOCK_LIBRARIES set, not 0)."""
    return os.environ.get(STOCK_ENV, "").strip() not in ("", "0")


# libraries whose patches wait until privet first imports them (dp-accounting costs ~0.8 s
# to import, which a run without DP never needs): the package imported last of them
DEFERRED = {"dp-accounting": "dp_accounting"}
_REQUESTED: set[str] = set()  # libraries install() has patched or set to patch on import


def install(*libraries: str) -> tuple[str, ...]:
    """Install the patches of `libraries` (names as in LIBRARIES; default: all) unless
    running stock; idempotent. A library in DEFERRED that is not imported yet is patched
    the moment its import completes. Returns the libraries patched in this process so far.
    Raises PatchError where an installed version differs from the one a patch was
    written against, KeyError for an unknown library name."""
    if not stock():
        for name in libraries or tuple(LIBRARIES):
            if name in _REQUESTED:  # installed, or waiting for its import: nothing to do
                continue
            patch = LIBRARIES[name]
            # the version first, from the package's metadata (no import): one line now,
            # not an error at the first use of a deferred library
            check_version(name, importlib.metadata.version(name), WRITTEN_FOR[name])
            package = DEFERRED.get(name)
            if package and package not in sys.modules:
                _after_import(package, lambda patch=patch: _install_module(patch))
            else:
                importlib.import_module(patch).install()
            _REQUESTED.add(name)
    return installed()


def _install_module(patch: str) -> None:
    """Install `patch` (a module's name) now; if that module is what is importing the
    library (partway through its own import), ask it to install itself as it finishes."""
    module = sys.modules.get(patch)
    if module is not None and getattr(getattr(module, "__spec__", None), "_initializing",
                                      False):
        module.INSTALL_WHEN_LOADED = True
        return
    importlib.import_module(patch).install()


class _Then(importlib.abc.Loader):
    """A module's own loader, then `then()` once the module has run."""

    def __init__(self, loader, then) -> None:
        self._loader, self._then = loader, then

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        self._then()

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: gives `package`'s own spec a loader that calls `then` after."""

    def __init__(self, package: str, then) -> None:
        self.package, self.then = package, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.package:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _Then(spec.loader, self.then)
        return spec


def _after_import(package: str, then) -> None:
    if not any(isinstance(f, _AfterImport) and f.package == package for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport(package, then))


def installed() -> tuple[str, ...]:
    """The libraries whose patches this process has installed (for summary.json)."""
    return tuple(name for name, module in LIBRARIES.items()
                 if getattr(sys.modules.get(module), "INSTALLED", False))


def check_version(library: str, installed_version: str, written_for: tuple[str, ...]) -> None:
    """Raise PatchError unless `installed_version` starts with one of `written_for`."""
    if not installed_version.startswith(written_for):
        raise PatchError(
            f"{library} {installed_version} is not a version privet's patches of its internals "
            f"were written for ({', '.join(v + 'x' for v in written_for)}): install one, or "
            f"set {STOCK_ENV}=1 to run on the stock library (slower)")
