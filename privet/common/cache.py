"""privet's cache directory: results that are slow to compute and the same every time
(noise calibrations, one-step PLDs, the digits split). `PRIVET_CACHE_DIR`, else
~/.cache/privet. A cache that cannot be read or written only costs the time again."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """The cache directory (not created here)."""
    return Path(os.environ.get("PRIVET_CACHE_DIR") or Path.home() / ".cache" / "privet")


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`arrays` as an .npz file at `path` (numpy's format, no pickle), written to a
    temporary file and renamed, so a reader never sees half of one; an OSError (a full or
    read-only disk) is ignored."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError:
        pass
