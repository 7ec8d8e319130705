"""Retraining policies: in which rounds the federation trains, and whether a retraining
starts from a fresh model.

Every run trains for `drift.warmup-rounds` rounds first; the model is then in use, and a
policy decides when to train again, for `drift.retrain-rounds` rounds each time:

- never: the deployed model is never retrained (the baseline drift hurts);
- periodic: every `drift.period` windows after the warm-up, whatever the signals say;
- on-drift: in the round a drift is detected (the window's monitoring comes first).

`drift.retrain = "reset"` starts each retraining from a new initialisation (old knowledge
can mislead after a concept drift); "fine-tune" continues from the current model (cheaper
when the change is small). Small classes with one decision each (pfl-research's style).
"""

from __future__ import annotations

from dataclasses import dataclass

from privet.common.config import DriftConfig


@dataclass
class Decision:
    train: bool       # the round trains (on its window's rows)
    reset: bool       # first re-initialise the model
    retrain: bool     # a retraining starts in this round (a trigger)


@dataclass
class RetrainPolicy:
    """Tracks the training schedule; `decide` is called once per round, after the round's
    monitoring (with `detected` = a drift event in it)."""
    config: DriftConfig
    rounds_per_window: int
    until: int = 0              # last round of the current training stretch

    def __post_init__(self) -> None:
        self.until = self.config.warmup_rounds

    def _triggered(self, server_round: int, window: int, new_window: bool, detected: bool
                   ) -> bool:
        name = self.config.policy
        if name == "on-drift":
            return detected
        if name == "periodic":
            warm = (self.config.warmup_rounds - 1) // self.rounds_per_window
            return new_window and window > warm and (window - warm) % self.config.period == 0
        return False

    def decide(self, server_round: int, window: int, new_window: bool, detected: bool
               ) -> Decision:
        if server_round <= self.config.warmup_rounds:
            return Decision(train=True, reset=False, retrain=False)
        trigger = self._triggered(server_round, window, new_window, detected)
        if trigger:
            starts = server_round > self.until  # not already in a retraining stretch
            self.until = server_round + self.config.retrain_rounds - 1
            return Decision(train=True, reset=starts and self.config.retrain == "reset",
                            retrain=True)
        return Decision(train=server_round <= self.until, reset=False, retrain=False)
