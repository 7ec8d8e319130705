"""Privacy ledgers: what each piece of data has spent, over every run that touched it.

State only; the maths live in `accountants`.

- A `Spend` is one composed mechanism: `steps` Poisson-subsampled Gaussian steps of noise
  multiplier σ at rate q (q = 1: no subsampling), and what it paid for (DP-SGD, the
  preprocessing statistics, ...).
- A `SpendRecord` is what one client spent in one run, on one set of rows: the rows are
  named by `row_digests` of their cells, so the record keeps meaning when the file grows,
  the split is re-seeded or the client gets another id.
- A store keeps records: `MemoryStore` (a simulation without `ledger-dir`: the ledger lives
  and dies with its run) or `LedgerDir` (a folder on disk, next to a node's data or at
  `ledger-dir`, plus a second copy under the state directory, so that a ledger that is
  deleted, emptied or truncated stops the client instead of reading as "nothing spent").
- `DataLedger` is one client's view: every record that touched any of its rows. Rows with
  the same records form a group; the client's ε is the largest over its groups, so no row's
  ε passes the target whichever runs touched it.

Forgetting spend is an explicit act (`forget`, behind `privet ledger --forget`), never the
effect of a missing or empty file or of a changed config.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from privet.common.privacy import accountants
from privet.common.results import atomic_write_bytes, atomic_write_text

FORMAT = 2
FORGET = "`privet ledger {folder} --forget {record} --yes`"  # the explicit way to forget
LEDGER_FOLDER = ".privet-ledger"
LEGACY_PATTERN = ".privet-ledger-*.json"  # privet before format 2: one history per client
ALL_ROWS = ""  # a record's `rows` when it covers every row of whoever holds the ledger

History = tuple[tuple[float, float, int], ...]


class LedgerError(ValueError):
    """A ledger cannot be trusted (unreadable, emptied, shorter than its copy, missing)."""


class BudgetDeclined(Exception):
    """A spend was not recorded: it would take some row past its target ε."""


@dataclass(frozen=True)
class Spend:
    """`steps` compositions of a Gaussian mechanism with noise multiplier `sigma`, each
    applied to a Poisson sample at rate `rate` (1.0: to all rows), paid for `purpose`."""
    sigma: float
    rate: float
    steps: int
    purpose: str = "dp-sgd"

    def as_entry(self) -> tuple[float, float, int]:
        return (self.sigma, self.rate, self.steps)

    def to_list(self) -> list:
        return [self.sigma, self.rate, self.steps, self.purpose]

    @classmethod
    def from_list(cls, item) -> "Spend":
        sigma, rate, steps, *rest = item
        if not (isinstance(steps, int) and steps >= 0):
            raise ValueError(f"steps {steps!r}")
        spend = cls(float(sigma), float(rate), int(steps), str(rest[0]) if rest else "dp-sgd")
        if not (spend.sigma >= 0 and 0 <= spend.rate <= 1):
            raise ValueError(f"entry {item!r}")
        return spend


def history_of(spends: Iterable[Spend]) -> History:
    return tuple(s.as_entry() for s in spends)


def _append(spends: list[Spend], spend: Spend) -> None:
    """Append, merging with the last entry when σ, q and purpose are unchanged."""
    if spend.steps <= 0:
        return
    if spends and (spends[-1].sigma, spends[-1].rate, spends[-1].purpose) == (
            spend.sigma, spend.rate, spend.purpose):
        last = spends[-1]
        spends[-1] = Spend(last.sigma, last.rate, last.steps + spend.steps, last.purpose)
    else:
        spends.append(spend)


@dataclass
class PrivacyLedger:
    """A plain history of spends (the server's user-level ledger of one run, or a client's
    in a test): `history` is [(σ, q, steps), ...], the shape Opacus' accountants keep."""
    spends: list[Spend] = field(default_factory=list)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int,
               purpose: str = "dp-sgd") -> None:
        _append(self.spends, Spend(float(noise_multiplier), float(sample_rate), int(steps),
                                   purpose))

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return list(history_of(self.spends))

    def epsilon(self, delta: float, accountant: str) -> float:
        return accountants.epsilon(self.history, delta, accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float, accountant: str) -> float:
        """ε if the given steps were added: the check made before spending."""
        trial = PrivacyLedger(list(self.spends))
        trial.record(noise_multiplier, sample_rate, steps)
        return trial.epsilon(delta, accountant)

    @property
    def steps(self) -> int:
        return sum(s.steps for s in self.spends)


# ------------------------------------------------------------------ records and rows

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class SpendRecord:
    """What one client spent in one run on one set of rows.

    `id` is unique per (run, client) and names the record's file; `rows` names the row set
    (`ALL_ROWS`: every row of the ledger's holder); `noise_source` is where its noise came
    from ("seeded" or "secure")."""
    id: str
    run: str
    client: str
    source: str
    rows: str
    noise_source: str
    spends: list[Spend] = field(default_factory=list)
    transform: str = ""  # the client's own DP-fitted transform (JSON), reused within the run
    # the columns a row's digest was computed from (tables; () for images or unknown)
    columns: tuple[str, ...] = ()
    # release -> the fingerprints of its inputs, one per time it was paid for (e.g.
    # "train-5" -> [digest of the global model it started from]): a resumed run that
    # replays a release with seeded noise and the same inputs releases the same output,
    # which costs nothing more (DataLedger.reserve)
    releases: dict[str, list[str]] = field(default_factory=dict)

    def record(self, spend: Spend) -> None:
        _append(self.spends, spend)

    @property
    def history(self) -> History:
        return history_of(self.spends)

    def to_dict(self) -> dict:
        return {"format": FORMAT, "id": self.id, "run": self.run, "client": self.client,
                "source": self.source, "rows": self.rows, "noise_source": self.noise_source,
                "spends": [s.to_list() for s in self.spends], "transform": self.transform,
                "columns": list(self.columns), "releases": self.releases}

    @classmethod
    def from_dict(cls, data, where: str) -> "SpendRecord":
        """Raises LedgerError naming `where` unless `data` is a whole format-2 record."""
        keys = ("id", "run", "client", "source", "rows", "noise_source", "spends")
        if not isinstance(data, dict) or data.get("format") != FORMAT or any(
                k not in data for k in keys):
            raise LedgerError(f"{where}: privacy ledger unreadable (expected a privet ledger "
                              f"record of format {FORMAT} with {', '.join(keys)})")
        try:
            spends = [Spend.from_list(item) for item in data["spends"]]
        except (TypeError, ValueError) as error:
            raise LedgerError(f"{where}: privacy ledger unreadable ({error})") from None
        if not spends:
            raise LedgerError(f"{where}: privacy ledger holds no spend; a record is only "
                              "written once something was spent, so it has been emptied")
        releases = data.get("releases", {})
        if not (isinstance(releases, dict) and all(
                isinstance(v, list) and all(isinstance(f, str) for f in v)
                for v in releases.values())):
            raise LedgerError(f"{where}: privacy ledger unreadable (releases: expected "
                              "{release: [fingerprint, ...]})")
        return cls(str(data["id"]), str(data["run"]), str(data["client"]),
                   str(data["source"]), str(data["rows"]), str(data["noise_source"]), spends,
                   str(data.get("transform", "")), tuple(map(str, data.get("columns", ()))),
                   {str(k): list(v) for k, v in releases.items()})

    @property
    def file_name(self) -> str:
        return record_file_name(self.id)


def record_file_name(record_id: str) -> str:
    """A record's file name: its id where the id is plain (letters, digits, `_.-`); else the
    id made plain plus a hash of the id, so two ids never share a file."""
    plain = _SAFE.sub("_", record_id)
    if plain == record_id and not record_id.startswith("."):
        return record_id + ".json"
    return f"{plain}-{hashlib.sha256(record_id.encode()).hexdigest()[:12]}.json"


def _digest(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def row_digests(rows: Iterable[Sequence]) -> np.ndarray:
    """One 64-bit digest (BLAKE2b) per row, in order, each row given as its cells. A cell
    counts as its text (str), and the k-th copy of a row within the sequence gets its own
    digest, so identical rows are distinct records: a row keeps its digest when rows are
    appended after it or the data is split otherwise. Two rows that collide (odds ~n²/2⁶⁵)
    only share their spend: never less is counted."""
    seen: dict[str, int] = {}
    out = []
    for row in rows:
        text = "\x1f".join(map(str, row))
        k = seen.get(text, 0)
        seen[text] = k + 1
        out.append(_digest(f"{text}\x1e{k}".encode("utf-8")))
    return np.asarray(out, dtype=np.uint64)


def array_digests(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`row_digests` for examples held as arrays (images): each example's bytes and label."""
    flat = np.ascontiguousarray(values).reshape(len(values), -1)
    seen: dict[bytes, int] = {}
    out = []
    for row, label in zip(flat, labels):
        data = row.tobytes() + b"\x1f" + str(int(label)).encode()
        k = seen.get(data, 0)
        seen[data] = k + 1
        out.append(_digest(data + b"\x1e" + str(k).encode()))
    return np.asarray(out, dtype=np.uint64)


def row_groups(rows: np.ndarray, rowsets: Sequence[np.ndarray | None]
               ) -> list[tuple[np.ndarray, int]]:
    """Split `rows` (sorted unique digests) by which of `rowsets` (None: all rows) hold them:
    [(bool per row set, how many rows), ...], one entry per distinct pattern, [] for no rows.
    This is how one record's spend reaches only the rows it touched."""
    if not len(rows):
        return []
    if not rowsets:
        return [(np.zeros(0, bool), len(rows))]
    masks = np.stack([np.ones(len(rows), bool) if covered is None
                      else np.isin(rows, covered, assume_unique=True) for covered in rowsets],
                     axis=1)
    keys, counts = np.unique(np.packbits(masks, axis=1), axis=0, return_counts=True)
    return [(np.unpackbits(key)[:len(rowsets)].astype(bool), int(count))
            for key, count in zip(keys, counts)]


MAX_GROUPS = 32  # distinct histories over one client's rows accounted exactly


def maximal(patterns: list[np.ndarray]) -> list[np.ndarray]:
    """The patterns (bool per record) not contained in another: composing more records never
    lowers ε, so a group of rows whose records are a subset of another group's is never the
    most spent one."""
    if not patterns:
        return []
    unique = np.unique(np.stack(patterns), axis=0)  # (patterns, records), bool
    keep = [not ((unique >= row).all(axis=1) & (unique != row).any(axis=1)).any()
            for row in unique]
    return list(unique[np.asarray(keep)])


def dominating_history(records: list[SpendRecord], rowsets: list[np.ndarray | None],
                       rows: np.ndarray) -> tuple[Spend, ...]:
    """A history whose ε is at least that of every one of `rows`, whichever of `records` it
    was in. Within a run whose records share none of `rows` (a run splits rows over its
    clients), a row was in one record only: per purpose, one mechanism with the smallest σ,
    the largest q and the most steps of any record dominates each record's (a Gaussian with
    less noise, Poisson sampling at a higher rate and more compositions each never lose
    privacy loss). A run whose records share a row is charged with all of them."""
    by_run: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_run.setdefault(record.run, []).append(i)
    history: list[Spend] = []
    for run in sorted(by_run):
        members = by_run[run]
        covered = [rowsets[i] if rowsets[i] is not None else rows for i in members]
        mine = [np.intersect1d(rows, c, assume_unique=True) for c in covered]
        if len(members) > 1 and sum(map(len, mine)) > len(np.unique(np.concatenate(mine))):
            history += [s for i in members for s in records[i].spends]  # a row in two
            continue
        by_purpose: dict[str, list[tuple[float, float, int]]] = {}
        for i in members:
            totals: dict[str, list[Spend]] = {}
            for spend in records[i].spends:
                totals.setdefault(spend.purpose, []).append(spend)
            for purpose, spends in totals.items():
                by_purpose.setdefault(purpose, []).append(
                    (min(x.sigma for x in spends), max(x.rate for x in spends),
                     sum(x.steps for x in spends)))
        one = [Spend(min(o[0] for o in options), max(o[1] for o in options),
                     max(o[2] for o in options), purpose)
               for purpose, options in by_purpose.items()]
        every = [s for i in members for s in records[i].spends]
        # both bound each row's spend in this run; the smaller ε bounds it more tightly
        # (the one mechanism is loose when the records differ a lot: then all of them is)
        history += min((one, every), key=lambda h: accountants.epsilon(
            history_of(h), 1e-5, "pld"))
    return tuple(history)


def rowset_id(digests: np.ndarray) -> str:
    return hashlib.blake2b(np.asarray(digests, dtype="<u8").tobytes(),
                           digest_size=12).hexdigest()


# ------------------------------------------------------------------ stores

class MemoryStore:
    """Records kept in a dict (a ClientApp's context.state, serialised by the caller): every
    record covers all of its holder's rows. Lives and dies with the run."""

    location = "memory (this run only)"

    def __init__(self, records: Iterable[SpendRecord] = ()) -> None:
        self._records = {r.id: r for r in records}

    def records(self) -> list[SpendRecord]:
        return list(self._records.values())

    def rows(self, rowset: str) -> np.ndarray | None:
        return None

    def save_rows(self, digests: np.ndarray | None) -> str:
        return ALL_ROWS

    def save(self, record: SpendRecord) -> None:
        self._records[record.id] = record

    def locked(self):
        return contextlib.nullcontext()  # one run, one client: nobody to race

    def to_json(self) -> str:
        return json.dumps([r.to_dict() for r in self._records.values()])

    @classmethod
    def from_json(cls, text: str) -> "MemoryStore":
        return cls(SpendRecord.from_dict(item, "in-memory ledger") for item in json.loads(text))


class RunFileStore(MemoryStore):
    """A simulation's ledger without `ledger-dir`: it covers this run only, like a
    MemoryStore, but is kept in one JSON file of the run directory (`ledgers/`), so that a
    run resumed after its process ended (`privet simulate --resume`) continues it instead of
    starting from nothing. Written atomically before each reply leaves; not fsynced (a
    killed process loses nothing; a power loss may). Raises LedgerError for a file that is
    not a ledger."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            records: list[SpendRecord] = []
        except OSError as error:
            raise LedgerError(f"{self.path}: privacy ledger unreadable ({error})") from None
        else:
            try:
                items = json.loads(text)
            except ValueError:
                items = None
            if not isinstance(items, list):
                raise LedgerError(f"{self.path}: privacy ledger unreadable (expected a JSON "
                                  "list of privet ledger records)")
            records = [SpendRecord.from_dict(item, str(self.path)) for item in items]
        super().__init__(records)

    @property
    def location(self) -> str:
        return f"{self.path} (this run only)"

    def save(self, record: SpendRecord) -> None:
        super().save(record)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, self.to_json(), durable=False)


def state_dir() -> Path:
    """Where privet keeps the second copy of every ledger: $PRIVET_STATE_DIR, else
    $XDG_STATE_HOME/privet, else ~/.local/state/privet."""
    if os.environ.get("PRIVET_STATE_DIR"):
        return Path(os.environ["PRIVET_STATE_DIR"])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "privet"


class LedgerDir:
    """Records on disk: `<directory>/.privet-ledger/spend/<record>.json` and the row sets they
    name, `rows/<id>.u64` (sorted little-endian uint64 digests); the server's user-level
    records under `.privet-ledger/user-level/`. Every write goes to this folder first, then
    to its copy under `state_dir()/ledger-copies/<ledger id>/`; reading checks the two
    against each other. The ledger's id is in the folder (`id`), so a moved folder finds its
    copy, and the state directory remembers which id each path had, so a deleted folder is
    noticed. Each record has one writer (its client), row sets are named by their content:
    concurrent clients sharing one folder never write the same file differently."""

    def __init__(self, directory: str | Path, part: str = "",
                 copy_root: Path | None = None) -> None:
        directory = Path(directory).expanduser().resolve()
        base = directory if directory.name == LEDGER_FOLDER else directory / LEDGER_FOLDER
        self.root = base / part if part else base  # part: "user-level" for the server's
        self._legacy_dir = None if part else base.parent
        self._copies = copy_root or state_dir() / "ledger-copies"
        self._path_key = hashlib.sha256(str(self.root).encode()).hexdigest()[:16]
        self._rows: dict[str, np.ndarray] = {}
        self._thread_lock, self._depth = threading.RLock(), 0  # `locked` re-entered: one flock

    # -- which copy is this folder's
    def _known_id(self) -> str:
        """The ledger's id: from the folder, else what the state directory remembers for
        this path (the folder, or its id, was deleted), else "" (a new ledger). Raises
        LedgerError when the folder names another id than the one this path had while that
        one's copy records spend (its id was emptied or rewritten)."""
        try:
            remembered = (self._copies / "paths" / self._path_key).read_text(
                encoding="utf-8").strip()
        except OSError:
            remembered = ""
        try:
            found = (self.root / "id").read_text(encoding="utf-8").strip()
        except OSError:
            found = ""
        if not found:
            return remembered
        if remembered and found != remembered and self._listed(self._copies / remembered):
            raise LedgerError(
                f"{self.root / 'id'}: says this ledger is {found!r}, but the ledger kept at "
                f"this path was {remembered!r}, whose copy records spend "
                f"({self._copies / remembered}): the id was rewritten or the folder replaced;"
                f" restore the id, or forget that spend knowingly with privet ledger "
                f"--forget")
        return found

    @property
    def copy(self) -> Path:
        known = self._known_id()
        return self._copies / (known or f"new-{self._path_key}")

    def _ensure_id(self) -> str:
        known = self._known_id()
        if not known:
            known = os.urandom(12).hex()
        try:
            written = (self.root / "id").read_text(encoding="utf-8").strip()
        except OSError:
            written = ""
        if written != known:  # a new folder, or an id emptied: its copy holds the truth
            atomic_write_text(self.root / "id", known + "\n")
        index = self._copies / "paths" / self._path_key
        if not index.is_file() or index.read_text(encoding="utf-8").strip() != known:
            atomic_write_text(index, known + "\n")
            atomic_write_text(self._copies / known / "origin", str(self.root) + "\n")
        return known

    @property
    def location(self) -> str:
        return str(self.root)

    # -- reading
    def _remedy(self, name: str) -> str:
        folder = self.root.parent if self.root.name == LEDGER_FOLDER else self.root.parent.parent
        return (f"; restore it from {self.copy / 'spend' / name}, or forget its spend "
                f"knowingly: {FORGET.format(folder=folder, record=Path(name).stem)}")

    def _read(self, path: Path) -> SpendRecord:
        try:
            return SpendRecord.from_dict(json.loads(path.read_text(encoding="utf-8")),
                                         str(path))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            if not isinstance(error, LedgerError):
                error = LedgerError(f"{path}: privacy ledger unreadable "
                                    f"({type(error).__name__}: {error})")
            raise LedgerError(str(error) + self._remedy(path.name)) from None

    def _listed(self, root: Path) -> dict[str, Path]:
        folder = root / "spend"
        return {p.name: p for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}

    def records(self) -> list[SpendRecord]:
        """Every record, checked against the copy; none when neither exists yet. Raises
        LedgerError, naming the file, when a record is unreadable or empty, its rows are
        missing or damaged, the copy holds a record, steps or rows that this folder has lost,
        or a row set remains that no record names (its record was deleted)."""
        copy = self.copy
        primary, copies = self._listed(self.root), self._listed(copy)
        missing = sorted(set(copies) - set(primary))
        if missing:
            where = self.root / "spend" / missing[0]
            raise LedgerError(
                f"{where}: privacy ledger missing, while its copy records spend "
                f"({len(missing)} record(s) in all)" + self._remedy(missing[0]))
        found = []
        for name, path in primary.items():
            record = self._read(path)
            if name in copies:
                self._check_against_copy(record, path, copies[name])
            self.rows(record.rows)  # present and whole, or LedgerError
            found.append(record)
        named = {r.rows for r in found}
        orphans = sorted(p.stem for p in (self.root / "rows").glob("*.u64")
                         if p.stem not in named) if (self.root / "rows").is_dir() else []
        if orphans:
            folder = self.root.parent if self.root.name == LEDGER_FOLDER else \
                self.root.parent.parent
            raise LedgerError(
                f"{self.root / 'rows' / (orphans[0] + '.u64')}: rows that no privacy ledger "
                f"record names ({len(orphans)} row set(s)): the record of their spend was "
                f"deleted; restore it from a copy, or forget that spend knowingly with "
                f"`privet ledger {folder} --forget-orphans --yes`")
        found += self._legacy()
        return found

    def _check_against_copy(self, record: SpendRecord, path: Path, copy_path: Path) -> None:
        try:
            kept = SpendRecord.from_dict(json.loads(copy_path.read_text(encoding="utf-8")),
                                         str(copy_path))
        except (OSError, ValueError):
            return  # a damaged copy is rewritten by the next save; the primary is whole
        # the primary is written first, so it may be ahead of its copy, never behind
        if len(record.spends) < len(kept.spends) or any(
                (a.sigma, a.rate, a.purpose) != (b.sigma, b.rate, b.purpose) or a.steps < b.steps
                for a, b in zip(record.spends, kept.spends)):
            raise LedgerError(f"{path}: privacy ledger differs from its copy: its spend is "
                              "not the copy's, or less" + self._remedy(path.name))
        if record.rows != kept.rows:  # rows may only grow within a run (the data did)
            ours, theirs = self.rows(record.rows), self.rows_of_copy(kept.rows)
            if ours is None or theirs is None or not np.isin(theirs, ours).all():
                raise LedgerError(f"{path}: privacy ledger names other rows than its copy"
                                  + self._remedy(path.name))

    def _legacy(self) -> list[SpendRecord]:
        """Ledgers of privet before format 2 (one history per experiment and client, no
        rows): read as covering every row of whoever reads this folder, never dropped."""
        out = []
        if self._legacy_dir is None:
            return out
        for path in sorted(self._legacy_dir.glob(LEGACY_PATTERN)):
            try:
                history = json.loads(path.read_text(encoding="utf-8"))["history"]
                spends = [Spend.from_list(item) for item in history]
            except (OSError, ValueError, KeyError, TypeError):
                raise LedgerError(f"{path}: privacy ledger unreadable (an older privet's "
                                  "format); restore it, or remove it knowingly (that forgets "
                                  "its spend)") from None
            if not spends:
                raise LedgerError(f"{path}: privacy ledger holds no spend (an older privet's "
                                  "format); restore it, or remove it knowingly")
            out.append(SpendRecord(f"legacy-{path.stem}", "legacy", path.stem, str(path),
                                   ALL_ROWS, "seeded", spends))
        return out

    def rows_of_copy(self, rowset: str) -> np.ndarray | None:
        """A row set as the copy holds it (None: missing there too, or ALL_ROWS)."""
        if rowset == ALL_ROWS:
            return None
        try:
            return np.frombuffer((self.copy / "rows" / f"{rowset}.u64").read_bytes(),
                                 dtype="<u8").astype(np.uint64)
        except OSError:
            return None

    def rows(self, rowset: str) -> np.ndarray | None:
        """The digests of a row set (None for ALL_ROWS). Raises LedgerError when it is gone."""
        if rowset == ALL_ROWS:
            return None
        if rowset not in self._rows:
            path = self.root / "rows" / f"{rowset}.u64"
            try:
                digests = np.frombuffer(path.read_bytes(), dtype="<u8").astype(np.uint64)
            except OSError:
                raise LedgerError(f"{path}: the rows a privacy ledger record names are missing; "
                                  f"restore them from {self.copy / 'rows'}") from None
            if rowset_id(digests) != rowset:
                raise LedgerError(f"{path}: row set damaged (its content does not match its "
                                  f"name); restore it from {self.copy / 'rows'}")
            self._rows[rowset] = digests
        return self._rows[rowset]

    # -- writing
    def save_rows(self, digests: np.ndarray | None) -> str:
        if digests is None:
            return ALL_ROWS
        rowset = rowset_id(digests)
        data = np.asarray(digests, dtype="<u8").tobytes()
        self._ensure_id()
        for root in (self.root, self.copy):
            path = root / "rows" / f"{rowset}.u64"
            if not path.exists():
                atomic_write_bytes(path, data)
        self._rows[rowset] = np.asarray(digests, dtype=np.uint64)
        return rowset

    def save(self, record: SpendRecord) -> None:
        text = json.dumps(record.to_dict(), indent=1)
        self._ensure_id()
        path = self.root / "spend" / record.file_name
        held = self._read(path).id if path.exists() else record.id
        if held != record.id:
            raise LedgerError(f"{path}: holds record {held!r}, not {record.id!r}: refusing "
                              "to overwrite another run's spend")
        atomic_write_text(path, text)  # first: the truth
        atomic_write_text(self.copy / "spend" / record.file_name, text)

    @contextlib.contextmanager
    def locked(self):
        """Hold this folder's lock (flock on `<folder>/lock`): a check of the budget and the
        record of the spend it allows are one step for every process sharing the folder, and
        a reader never sees a row set whose record is still being written. Re-entrant within
        a thread (reserve → record): a second flock on a new descriptor would wait on the
        first."""
        with self._thread_lock:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / "lock", "a+b") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)
                self._depth = 1
                try:
                    yield
                finally:
                    self._depth = 0
                    fcntl.flock(handle, fcntl.LOCK_UN)

    def forget(self, record_ids: Iterable[str]) -> list[str]:
        """Delete records, and the row sets no other record names, from this folder and its
        copy: the explicit way to forget spend."""
        gone = []
        for record_id in record_ids:
            name = record_file_name(record_id)
            for root in (self.root, self.copy):
                (root / "spend" / name).unlink(missing_ok=True)
            gone.append(record_id)
        self.forget_orphans()
        return gone

    def forget_orphans(self) -> list[str]:
        """Delete the row sets no readable record names (their records were deleted)."""
        named = set()
        for root in (self.root, self.copy):
            for path in self._listed(root).values():
                try:
                    named.add(str(json.loads(path.read_text(encoding="utf-8"))["rows"]))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        removed = []
        for root in (self.root, self.copy):
            folder = root / "rows"
            for path in sorted(folder.glob("*.u64")) if folder.is_dir() else []:
                if path.stem not in named:
                    path.unlink()
                    removed.append(path.stem)
        self._rows.clear()
        return sorted(set(removed))


# ------------------------------------------------------------------ one client's view

def _same_row_identity(found: list[SpendRecord], current: SpendRecord, store) -> None:
    """Raise LedgerError when earlier records of this data source identified its rows by
    other columns than this run does (a column added to the file, dropped, or ignored in
    data.column-types): their digests cannot meet this run's, so their spend would be
    silently forgotten."""
    if not current.columns:
        return
    for record in found:
        if record.source == current.source and record.columns and \
                record.columns != current.columns and record.id != current.id:
            now, then = set(current.columns), set(record.columns)
            change = "; ".join(part for part in (
                f"now also {sorted(now - then)}" if now - then else "",
                f"no longer {sorted(then - now)}" if then - now else "") if part)
            raise LedgerError(
                f"{store.location}: earlier runs on {current.source} (record {record.id}) "
                f"identified its rows by other columns ({change}): privet cannot match "
                "rows across that change, so their spend would be forgotten; keep the "
                "columns as they were (data.column-types, the file's header), or forget "
                "that spend knowingly with privet ledger --forget")


class DataLedger:
    """The spend on one client's rows: its record in this run (`current`) and every other
    record in the store whose rows meet its rows.

    `digests` are the client's rows (None: the store's records all cover its rows, as in
    a MemoryStore). Raises LedgerError when the store cannot be trusted."""

    def __init__(self, store, current: SpendRecord, digests: np.ndarray | None) -> None:
        self.store, self.digests = store, digests
        self.conservative = False  # rows charged with more than they spent (MAX_GROUPS)
        with store.locked():  # not between another process's row set and its record
            found = store.records()
        self.current = next((r for r in found if r.id == current.id), current)
        self.current.columns = current.columns
        _same_row_identity(found, current, store)
        self._read_others(found)

    def _read_others(self, found: list[SpendRecord]) -> None:
        others = sorted((r for r in found if r.id != self.current.id), key=lambda r: r.id)
        self._prior = self._groups(others)

    def reserve(self, spends: Sequence[Spend], target: float, delta: float,
                accountant: str, release: tuple[str, str] | None = None) -> float | None:
        """Record `spends` (before what they pay for runs) if the ε of every row stays
        within `target` with everything recorded on these rows until now, re-read under the
        store's lock, so that runs sharing a ledger folder cannot both pass a check that only
        one of them fits in. Returns the ε after, or None (nothing recorded) when it would
        pass the target.

        `release` = (name, fingerprint of its inputs) names what the spends pay for, e.g.
        ("train-5", digest of round 5's global model). A release already paid for with the
        same fingerprint under seeded noise is a replay (a resumed run redoing a round the
        server never checkpointed): the same inputs and the same noise give the same
        output, so nothing more is spent and the ε now is returned. Under secure noise, or
        with other inputs, the redo draws new noise and is paid again (`attempt` then
        counts it)."""
        with self.store.locked():
            self._read_others(self.store.records())
            if release is not None and self.replay(*release):
                return self.epsilon(delta, accountant)
            after = self.epsilon(delta, accountant, spends)
            if after > target:
                return None
            if release is not None:  # saved with the first spend, below
                self.current.releases.setdefault(release[0], []).append(release[1])
            for spend in spends:
                self.record(spend)
            return after

    def replay(self, name: str, fingerprint: str) -> bool:
        """Whether release `name` with these inputs was paid for before under seeded noise."""
        return (self.current.noise_source == "seeded"
                and fingerprint in self.current.releases.get(name, ()))

    def attempt(self, name: str, fingerprint: str) -> int:
        """Which payment of release `name` these inputs are (0: the first). Seeded noise is
        drawn from a seed that includes it: a redo with other inputs never reuses the
        noise of a release already made (their difference would be noise-free)."""
        paid = self.current.releases.get(name, [])
        return paid.index(fingerprint) if fingerprint in paid else len(paid)

    def _groups(self, records: list[SpendRecord]) -> list[tuple[Spend, ...]]:
        """Distinct spend histories over this client's rows (one per group of rows touched
        by the same records), each composed in record order; [()] when nothing touched."""
        if self.digests is None or not len(self.digests):
            return [tuple(s for r in records for s in r.spends)]
        rowsets = [self.store.rows(r.rows) for r in records]
        patterns = maximal([touched for touched, _ in row_groups(self.digests, rowsets)])
        histories = list(dict.fromkeys(
            tuple(s for r, on in zip(records, touched) if on for s in r.spends)
            for touched in patterns))  # runs that spent alike on each client give one
        if len(histories) > MAX_GROUPS:
            # Many distinct mixes of earlier runs (rows re-split again and again): each would
            # cost ε queries every round. One history that dominates every row's is charged
            # instead (never less than any row's true spend; see `dominating_history`).
            self.conservative = True
            touched = np.logical_or.reduce(patterns)
            return [dominating_history([r for r, on in zip(records, touched) if on],
                                       [c for c, on in zip(rowsets, touched) if on],
                                       self.digests)]
        return histories

    def prior_histories(self) -> list[History]:
        """What earlier runs (and other records) spent, per group of rows."""
        return sorted({history_of(g) for g in self._prior})

    def groups(self, extra: Sequence[Spend] = ()) -> list[tuple[Spend, ...]]:
        """Per group of rows: earlier spend, then this run's, then `extra` (being weighed)."""
        now = tuple(self.current.spends) + tuple(extra)
        return list(dict.fromkeys(g + now for g in self._prior))

    def epsilon(self, delta: float, accountant: str, extra: Sequence[Spend] = ()) -> float:
        """The largest ε over this client's rows, with `extra` added if given."""
        return max(accountants.epsilon(history_of(g), delta, accountant)
                   for g in self.groups(extra))

    def worst(self, delta: float, accountant: str) -> tuple[Spend, ...]:
        """The spends of the rows whose ε is largest, over every run."""
        return max(self.groups(),
                   key=lambda g: accountants.epsilon(history_of(g), delta, accountant))

    def prior_epsilon(self, delta: float, accountant: str) -> float:
        return max(accountants.epsilon(h, delta, accountant) for h in self.prior_histories())

    def report(self, delta: float, accountant: str) -> dict:
        """What the client tells the server about its spend (JSON-ready): the ε of its most
        spent rows over every run, their full history, this run's spends, the earlier runs'
        ε, where the ledger lives and where the noise came from."""
        worst = self.worst(delta, accountant)
        return {"epsilon": accountants.epsilon(history_of(worst), delta, accountant),
                "history": [s.to_list() for s in worst],
                "run_spends": [s.to_list() for s in self.current.spends],
                "prior_epsilon": self.prior_epsilon(delta, accountant),
                "row_groups": len(self._prior), "conservative": self.conservative,
                "noise_source": self.current.noise_source, "ledger": self.location,
                "record": self.current.id if self.current.spends else None}

    def record(self, spend: Spend) -> None:
        """Add spend to this run's record and save it (disk first, before any reply)."""
        if spend.steps <= 0:
            return
        with self.store.locked():  # the row set and the record that names it: one step
            if not self.current.spends and self.current.rows == ALL_ROWS:
                self.current.rows = self.store.save_rows(self.digests)
            elif self.digests is not None and self.current.rows != ALL_ROWS:
                covered = self.store.rows(self.current.rows)
                if not np.isin(self.digests, covered, assume_unique=True).all():
                    # the data grew within the run: the record covers every row it touched
                    self.current.rows = self.store.save_rows(np.union1d(covered,
                                                                        self.digests))
            self.current.record(spend)
            self.store.save(self.current)

    @property
    def location(self) -> str:
        return self.store.location
