"""A client's privacy ledger: every DP-SGD step it ever took, as (σ, q, steps) entries.

State only; the maths live in `accountants`. The ledger is what makes ε cumulative:
it outlives a round (kept in the ClientApp's `context.state`), so the ε reported
after round r composes rounds 1..r.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from common.privacy import accountants
from common.results import atomic_write_text


@dataclass
class PrivacyLedger:
    history: list[tuple[float, float, int]] = field(default_factory=list)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        """Append steps, merging with the last entry when σ and q are unchanged."""
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            sigma, q, n = self.history[-1]
            self.history[-1] = (sigma, q, n + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    def epsilon(self, delta: float, accountant: str) -> float:
        return accountants.epsilon(self.history, delta, accountant)

    def epsilon_after(self, noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float, accountant: str) -> float:
        """ε if the given steps were added: the check a client makes before it trains."""
        trial = PrivacyLedger(list(self.history))
        trial.record(noise_multiplier, sample_rate, steps)
        return trial.epsilon(delta, accountant)

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    def state_dict(self) -> dict:
        return {"history": [list(entry) for entry in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [(float(s), float(q), int(n)) for s, q, n in state.get("history", [])]

    def to_json(self) -> str:
        return json.dumps(self.state_dict())

    @classmethod
    def from_json(cls, text: str) -> "PrivacyLedger":
        ledger = cls()
        ledger.load_state_dict(json.loads(text))
        return ledger


class LedgerFile:
    """A client's ledger on disk, next to its data, keyed by the experiment identity.

    Written atomically after every round, so a node that crashes or restarts resumes the
    budget it has spent instead of starting again at zero.
    """

    def __init__(self, directory: str | Path, experiment_id: str, client: str) -> None:
        self.path = Path(directory) / f".privet-ledger-{experiment_id}-{client}.json"

    def load(self) -> PrivacyLedger:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return PrivacyLedger()
        try:
            return PrivacyLedger.from_json(text)
        except (ValueError, TypeError, KeyError) as error:
            # Never silently reset a spent budget: a damaged ledger stops the client.
            raise ValueError(f"{self.path}: privacy ledger unreadable ({error}); restore it "
                             "or remove it knowingly (that forgets the spent budget)") from None

    def save(self, ledger: PrivacyLedger) -> None:
        atomic_write_text(self.path, ledger.to_json())
