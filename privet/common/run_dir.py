"""Whose a run directory is: privet writes into, and replaces, only directories it made.

A run directory carries a marker file (`.privet-run`) from the moment privet claims it,
and a run holds an exclusive lock on it (`flock` of `.privet-lock`, released by the OS when
the process ends, however it ends) from before any data is read to its end. So a second
run into the same `--out` is refused at once instead of mixing its files with the first's,
a folder of the user's is never written into or cleared, and `--overwrite` replaces privet
runs only. Every refusal is one line naming the directory and what to do.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from pathlib import Path

MARKER = ".privet-run"
LOCK = ".privet-lock"
_held: dict[Path, int] = {}  # directories this process has claimed: path -> lock fd


class RunDirError(ValueError):
    """The run directory cannot be used: one line naming it and what to do."""


def _reason(error: OSError) -> str:
    if error.errno == errno.EROFS:
        return "read-only file system"
    if error.errno == errno.ENOSPC:
        return "no space left on device"
    return (error.strerror or str(error)).lower()


def is_privet_dir(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _check_place(path: Path, option: str) -> None:
    """Refuse a path that is a file, or lies under one, before anything is made."""
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            if not part.is_dir():
                what = "a file" if part == path else f"under {part}, which is a file"
                raise RunDirError(f"{option} {path}: {what}, not a directory")
            return


def _older_privet_run(path: Path) -> bool:
    """A run written by privet before run directories had a marker: its summary.json says
    so (privet's keys); it may be replaced like any privet run."""
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and {"status", "privacy", "versions"} <= set(summary)


def _check_contents(path: Path, option: str) -> None:
    """A folder that holds anything but privet's own files is the user's: refused."""
    if not path.is_dir() or is_privet_dir(path) or _older_privet_run(path):
        return
    found = sorted(p.name for p in path.iterdir() if p.name != LOCK)
    if found:
        shown = ", ".join(found[:5]) + (f" ... ({len(found)} in all)" if len(found) > 5 else "")
        raise RunDirError(f"{option} {path}: not empty and not a privet run: it holds {shown}; "
                          "pass an empty or new folder (privet never writes into, or clears, "
                          "a folder it did not make)")


def mark(path: Path, option: str = "--out") -> Path:
    """Make `path` a privet directory (created if needed) without locking it: for a folder
    that a later `claim` (another process) will lock, e.g. a comparison's run folders."""
    path = Path(path)
    _check_place(path, option)
    _check_contents(path, option)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not is_privet_dir(path):
            (path / MARKER).write_text(json.dumps({"privet": "run directory",
                                                   "created": time.time()}) + "\n")
    except OSError as error:
        raise RunDirError(f"{option} {path}: cannot create the run directory "
                          f"({_reason(error)})") from None
    return path


def claim(path: Path, *, option: str = "--out", finished: str = "",
          stale: tuple[str, ...] = (), overwrite: bool = False, wait: float = 0.0,
          waiting=None) -> Path:
    """Claim `path` for this process's run: refuse a file, a folder of the user's, one in use
    by another run, or (without `overwrite`) one holding a finished run (its `finished`
    file); then delete the `stale` files an earlier run of privet's left there. Raises
    RunDirError. Claiming a directory this process already holds is a no-op. `wait`: seconds
    to wait for another process to let go of it (calling `waiting(pid)` once first), e.g. a
    resumed ServerApp while the one its crashed SuperLink left behind shuts down."""
    path = Path(path).resolve()
    if path in _held:
        return path
    mark(path, option)
    try:
        fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise RunDirError(f"{option} {path}: cannot write to the run directory "
                          f"({_reason(error)})") from None
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        if time.monotonic() >= deadline:
            os.close(fd)
            raise RunDirError(f"{option} {path}: in use by another privet run (pid {holder}); "
                              "wait for it or pass another folder") from None
        if waiting is not None:
            waiting(holder)
            waiting = None
        time.sleep(0.5)
    if finished and (path / finished).exists() and not overwrite:
        os.close(fd)
        raise RunDirError(f"{option} {path}: already holds a run ({finished}); pass another "
                          "folder, or --overwrite to replace it")
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        for name in stale:
            if (path / name).is_dir() and not (path / name).is_symlink():
                shutil.rmtree(path / name)  # e.g. the ledgers of the run it replaces
            else:
                (path / name).unlink(missing_ok=True)
    except OSError as error:
        os.close(fd)
        raise RunDirError(f"{option} {path}: cannot write to the run directory "
                          f"({_reason(error)})") from None
    _held[path] = fd
    return path


def release(path: Path) -> None:
    """Give up this process's claim (the OS does it too when the process ends)."""
    fd = _held.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)
