"""Objects named by import path, `package.module:attr` (Flower's `module:attr` convention):
a user's model factory, dataset loader or strategy."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable


def import_attr(reference: str, key: str, error: type[ValueError] = ValueError,
                what: str = "attr") -> Callable:
    """The callable that `reference` names as `package.module:attr` (Flower's `module:attr`
    convention; `attr` may be dotted), for the setting `key` (`train.model`, `data.dataset`).

    The module is looked up as Flower does: the installed packages and whatever is on
    sys.path (Flower puts the app folder there), plus the current folder and then privet's
    project folder (its `experiments.examples`), which this adds (`privet` is a script:
    without it the user's folder is not on sys.path; `privet.simulate` adds the same two).
    Raises `error`
    with one line, `{key} = '{reference}': ...`, when the module cannot be imported (or
    raises while it is), lacks the attribute, or the attribute is not callable; `what` names
    the attribute in the message ("factory", "loader")."""
    module_name, _, attr = reference.partition(":")
    from privet.common.config import PROJECT_DIR

    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())  # `privet` is a script: let it see the user's folder
    if str(PROJECT_DIR) not in sys.path:
        sys.path.append(str(PROJECT_DIR))  # after the user's: theirs win
    try:
        found = importlib.import_module(module_name)
    except ImportError as problem:
        raise error(f"{key} = {reference!r}: cannot import {module_name!r} ({problem}); "
                    "it must be importable from the current folder or the Flower app "
                    "folder") from None
    except Exception as problem:  # noqa: BLE001 - the user's module failed while importing
        raise error(f"{key} = {reference!r}: importing {module_name!r} failed: "
                    f"{type(problem).__name__}: {one_line(problem)}") from None
    for part in attr.split("."):
        found = getattr(found, part, None)
        if found is None:
            raise error(f"{key} = {reference!r}: {module_name!r} has no {attr!r}")
    if not callable(found):
        raise error(f"{key} = {reference!r}: {attr!r} is not callable; expected a {what} "
                    "function")
    return found


def one_line(problem: BaseException | str) -> str:
    """An exception's message on one line (a user's code may raise multi-line messages)."""
    return " ".join(str(problem).split())
