"""Checkpoints: everything a round depends on, written after each round, so that a stopped
run continues after its last finished round (`privet simulate --resume RUN_DIR`, `privet
run --resume RUN_DIR`).

A checkpoint is one file, `checkpoint.pkl` in the run directory, replaced atomically after
every round (a pickled dict: pickle's C encoder, ~15x faster than torch.save on the
recorder's rows, ~10 ms at 5,000 client rows; not fsynced, like the other per-round files:
a killed process loses nothing, a power loss may lose the file, and the run then cannot
resume).
It holds:

- the global model after the round;
- the strategy's state (`strategy_state`): a server optimizer's moments, the adaptive
  clip, the seeded noise stream's position, the clients left out, ...;
- the recorder's state (the rows of rounds.csv and metrics.csv, what each client reported);
- what the model was built from (input shape, classes, features) and the shared
  transform, so that nothing before round 1 (data description, federated preprocessing,
  each paid for once) runs again;
- the config it was written under: a resume under another config is refused.

What it does not hold: the clients' ledgers. Each client records its spend before it
trains, in its own ledger (a simulation's in the run directory, a deployed node's next to
its data), so a round the server never checkpointed is still on them; the resumed run
replays it, and `DataLedger.reserve` charges a seeded replay of the same inputs nothing
more and a secure redo again.

Loading runs pickle: a checkpoint is trusted as the run directory that holds it is (privet
writes it; never resume from a file someone else gave you).
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from privet.common import results

CHECKPOINT = results.CHECKPOINT
FORMAT = 1
# strategy attributes that are per-round scratch, not state (the messages just sent)
_SCRATCH = frozenset({"_sent"})


class CheckpointError(ValueError):
    """A run cannot resume from its directory (no checkpoint, another config, unreadable)."""


def strategy_state(strategy: Any) -> dict[str, tuple[str, Any]]:
    """What a strategy object carries from round to round, by attribute.

    A strategy with its own `state_dict()` (and `load_state_dict`) is saved by it (the
    Opacus/torch convention; a user's strategy may define one). Otherwise every attribute
    is saved that is plain data pickle can keep: Flower's FedOpt moments (`m_t`, `v_t`,
    `current_arrays`), FedAvgM's `momentum_vector`, the adaptive clip, the clients left
    out. An attribute with a `state_dict()` (a seeded noise stream) is saved by it; a nested
    strategy (DP-FedAvg's server optimizer) the same way as this one; functions, the
    observers and what cannot be pickled (a secure noise stream, drawn afresh on resume)
    are not saved."""
    own = getattr(type(strategy), "state_dict", None)
    if callable(own):
        return {"": ("own", strategy.state_dict())}
    state: dict[str, tuple[str, Any]] = {}
    for name, value in vars(strategy).items():
        if name in _SCRATCH:
            continue
        if callable(getattr(value, "state_dict", None)):
            state[name] = ("state_dict", value.state_dict())
        elif _is_strategy(value):
            state[name] = ("strategy", strategy_state(value))
        elif not callable(value):
            try:
                pickle.dumps(value)
            except Exception:  # noqa: BLE001 - not data: left as constructed
                continue
            state[name] = ("value", value)
    return state


def load_strategy_state(strategy: Any, state: dict[str, tuple[str, Any]]) -> None:
    """Put back what `strategy_state` saved into a strategy built from the same config."""
    if "" in state and state[""][0] == "own":
        strategy.load_state_dict(state[""][1])
        return
    for name, (kind, value) in state.items():
        if kind == "state_dict":
            target = getattr(strategy, name, None)
            if callable(getattr(target, "load_state_dict", None)):
                target.load_state_dict(value)
        elif kind == "strategy":
            load_strategy_state(getattr(strategy, name), value)
        else:
            setattr(strategy, name, value)


RUN_ONLY = " (this run only)"  # how a RunFileStore names its location (privacy.ledger)


def check_ledgers(saved: "Checkpoint", where: Path) -> None:
    """Refuse (CheckpointError) a resume on which some client's spend would be forgotten:
    its ledger lived in memory (a Ray worker on another machine, without a shared run
    directory), or its file in the run directory (`ledgers/`) is gone or holds less than
    the client reported before the checkpoint, so the resumed run would start its spend from
    less than it spent. (A ledger folder on disk, `ledger-dir` or a deployed node's, guards
    itself with its second copy: common.privacy.ledger.LedgerDir.)"""
    lost, short = [], []
    for client, report in saved.recorder.get("spend", {}).items():
        location = str(report.get("ledger", ""))
        if location.startswith("memory"):
            lost.append(client)
        elif location.endswith(RUN_ONLY) and report.get("record"):
            if not _holds(Path(location[:-len(RUN_ONLY)]), str(report["record"]),
                          report.get("run_spends", [])):
                short.append((client, location[:-len(RUN_ONLY)]))
    order = lambda c: int(c) if c.isdigit() else 1 << 30  # noqa: E731
    if lost:
        lost.sort(key=order)
        raise CheckpointError(
            f"{Path(where) / CHECKPOINT}: client(s) {', '.join(lost[:5])}"
            f"{' ...' if len(lost) > 5 else ''} kept their privacy ledger in memory (a Ray "
            "worker that does not see the run directory), so a resumed run would forget "
            "their spend; set privacy.ledger-dir to storage every machine shares, and start "
            "the run again")
    if short:
        short.sort(key=lambda cs: order(cs[0]))
        client, path = short[0]
        raise CheckpointError(
            f"{path}: client {client}'s privacy ledger is missing or holds less than the "
            f"client reported spending before the checkpoint ({len(short)} client(s) in all); "
            "a resumed run would forget that spend: put the file back, or start the run "
            "again with --overwrite")


def _holds(path: Path, record_id: str, reported: list) -> bool:
    """Whether the ledger file at `path` holds record `record_id` with at least the steps
    of each purpose that `reported` ([σ, q, steps, purpose] entries) lists."""
    from privet.common.privacy.ledger import LedgerError, RunFileStore

    try:
        found = {r.id: r for r in RunFileStore(path).records()}.get(record_id)
    except LedgerError:
        return False
    if found is None:
        return not reported
    steps: dict[str, int] = {}
    for spend in found.spends:
        steps[spend.purpose] = steps.get(spend.purpose, 0) + spend.steps
    for *_, count, purpose in reported:
        steps[purpose] = steps.get(purpose, 0) - int(count)
    return all(left >= 0 for left in steps.values())


def _is_strategy(value: Any) -> bool:
    from flwr.serverapp.strategy import Strategy

    return isinstance(value, Strategy)


def _placed_anywhere(config: str) -> str:
    """A config without its `out-dir`: the checkpoint was found in the run directory, so
    where the run directory was named from (a relative path the first time, an absolute
    one on resume, a moved folder) does not make it another experiment."""
    return "\n".join(line for line in config.splitlines()
                     if not line.startswith("out-dir ="))


@dataclass
class Checkpoint:
    """One round's checkpoint (see the module doc). `arrays` is the global model's
    state_dict after round `round`; `model_input` = (input_shape, classes, features)."""
    round: int
    run: str
    config: str
    arrays: dict[str, torch.Tensor]
    strategy: dict[str, tuple[str, Any]]
    recorder: dict[str, Any]
    transform: str
    model_input: tuple
    python_random: Any
    torch_random: torch.Tensor

    def save(self, run_dir: Path) -> None:
        results.atomic_write_bytes(Path(run_dir) / CHECKPOINT,
                                   pickle.dumps({"format": FORMAT, **vars(self)},
                                                protocol=pickle.HIGHEST_PROTOCOL),
                                   durable=False)

    def restore_random(self) -> None:
        """The server process's global streams as they were after the round."""
        random.setstate(self.python_random)
        torch.set_rng_state(self.torch_random)

    @classmethod
    def load(cls, run_dir: Path, config: str) -> "Checkpoint":
        """The checkpoint in `run_dir`, written under the config `config` (TOML); raises
        CheckpointError naming the file and what is wrong."""
        path = Path(run_dir) / CHECKPOINT
        if not path.is_file():
            raise CheckpointError(
                f"{path}: no checkpoint: the run stopped before its first round ended, or "
                "was written by privet before resume existed; start it again instead")
        try:
            with open(path, "rb") as handle:
                data = pickle.load(handle)
        except Exception as error:  # noqa: BLE001 - torn, truncated, not a checkpoint
            raise CheckpointError(f"{path}: unreadable checkpoint ({type(error).__name__}: "
                                  f"{error})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a privet checkpoint of format {FORMAT}")
        data.pop("format")
        found = cls(**data)
        if _placed_anywhere(found.config) != _placed_anywhere(config):
            raise CheckpointError(f"{path}: written under another config than "
                                  f"{Path(run_dir) / results.CONFIG}; a run resumes with the "
                                  "config it started with")
        return found
