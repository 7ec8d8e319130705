"""A deployed run's results, carried back to the operator in the ServerApp's own log.

Flower 1.41 OSS has no way for `flwr run` to fetch files: `flwr pull` asks for an artifact
provider's download URL, which only Flower's enterprise SuperLink has. What it does give the
operator is the ServerApp's log (`flwr run --stream`, over the operator's connection and its
TLS). So at the end of a deployed run the ServerApp writes its small result files into its
log as a delimited block of base64 lines (each file with its size and SHA-256), and
`privet run`, which streams that log, decodes them into a local folder (never echoing the
block). Files past MAX_BYTES in all (a large model.pt) stay on the SuperLink machine only,
and the block says which.

Nothing in the block is more than the run directory already holds; the checkpoint and the
ledgers are never sent.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from privet.common import results

# what comes back, in this order (the most useful first, should the limit bite)
FILES = (results.SUMMARY, results.CONFIG, results.ROUNDS, results.METRICS,
         results.PARTITIONS, results.MODEL_SPEC, results.TRANSFORM, results.CLIENT_TRANSFORMS,
         results.PLOT, results.MODEL)
MAX_BYTES = 2 * 1024 * 1024  # in all, before base64 (Flower streams the log in messages)
CHUNK = 3000  # base64 characters a log line
TAG = "privet-results:"
_LINE = re.compile(re.escape(TAG) + r" (begin|file|data|skip|end)\b ?(.*?)\s*$")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def block(run_dir: Path, limit: int = MAX_BYTES) -> list[str]:
    """The lines that carry `run_dir`'s result files (FILES present), as the log gets them."""
    lines = [f"{TAG} begin {run_dir}"]
    used = 0
    for name in FILES:
        path = Path(run_dir) / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if used + len(data) > limit:
            lines.append(f"{TAG} skip {name} {len(data)}")
            continue
        used += len(data)
        lines.append(f"{TAG} file {name} {len(data)} {hashlib.sha256(data).hexdigest()}")
        text = base64.b64encode(data).decode("ascii")
        lines += [f"{TAG} data {text[i:i + CHUNK]}" for i in range(0, len(text), CHUNK)]
    lines.append(f"{TAG} end")
    return lines


@dataclass
class Reader:
    """Collects a block from streamed log lines (`feed` says which lines were its own)."""
    source: str | None = None  # the run directory on the SuperLink machine
    files: dict[str, bytes] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    broken: list[str] = field(default_factory=list)
    ended: bool = False
    _current: tuple[str, int, str] | None = None
    _parts: list[str] = field(default_factory=list)

    def feed(self, line: str) -> bool:
        found = _LINE.search(line)
        if not found:
            return False
        kind, rest = found.groups()
        if kind == "begin":  # a later block (a resumed run's) replaces an earlier one
            self.__init__(source=rest or None)
        elif kind == "data":
            self._parts.append(rest)
        else:
            self._close()
            if kind == "file":
                name, size, digest = (rest.split() + ["", "", ""])[:3]
                self._current = (name, int(size) if size.isdigit() else -1, digest)
            elif kind == "skip":
                name, size = (rest.split() + ["", ""])[:2]
                self.skipped[name] = int(size) if size.isdigit() else 0
            else:
                self.ended = True
        return True

    def _close(self) -> None:
        if self._current is None:
            return
        name, size, digest = self._current
        self._current, parts, self._parts = None, self._parts, []
        try:
            data = base64.b64decode("".join(parts), validate=True)
        except ValueError:
            data = b""
        if (not _NAME.fullmatch(name) or name not in FILES or len(data) != size
                or hashlib.sha256(data).hexdigest() != digest):
            self.broken.append(name)
            return
        self.files[name] = data

    def write(self, folder: Path) -> list[Path]:
        """The files into `folder` (made; it must be new or empty: never a user's files
        overwritten). Returns what was written."""
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise FileExistsError(f"{folder}: not empty; the results were not copied there")
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for name, data in self.files.items():
            path = folder / name
            path.write_bytes(data)
            written.append(path)
        return written
