"""Objects named by import path, `package.module:attr` (Flower's `module:attr` convention):
a user's model factory, dataset loader or strategy."""

from __future__ import annotations

import importlib
import os
import sys


class ImportPathError(ValueError):
    """An import path that names nothing importable; the message is one line."""


def load(path: str) -> object:
    """The object `package.module:attr` names (attr may be dotted: `Class.method`).

    The module is imported from the installed packages or from the current folder (`privet`
    is a console script, whose sys.path lacks it; Flower adds the app folder the same way).
    Raises ImportPathError: the module cannot be imported (its own error quoted), or has no
    such attribute."""
    module_name, _, attr = path.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        found = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportPathError(f"cannot import {module_name!r} ({error}); it must be "
                              "importable from the current folder or the Flower app "
                              "folder") from None
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise ImportPathError(f"{module_name!r} has no {attr!r}")
    return found
