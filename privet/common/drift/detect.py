"""Drift detectors on the federated signals of each window (server side, post-processing of
the clients' DP releases, so they cost no budget).

Two signals are watched, each by its own detector: the prequential error rate of the current
global model (a concept drift raises it) and the largest per-feature PSI against the
reference window (a covariate drift raises it even where the model still copes). A detection
on either is a drift event.

- "page-hinkley": river's PageHinkley (Page 1954; Hinkley 1971) in mode "up", threshold λ
  `drift.detector-threshold` on the error rate and `drift.psi-threshold` on PSI;
- "adwin": river's ADWIN (Bifet & Gavaldà 2007) on each signal;
- "threshold": the error rate rising more than `detector-threshold` above the reference
  window's, or PSI above `psi-threshold`; no library, and no memory beyond the reference.

Trade-off: with one value per window, ADWIN needs several windows of evidence and reacts
later; Page-Hinkley with a small λ reacts within a window or two but, on noised signals,
alarms more easily. The noise std of each signal is known (signals.sensitivity), which is
what the defaults were chosen against (the README gives the measured delays).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from privet.common.config import DriftConfig

SIGNALS = ("error_rate", "psi")


@dataclass
class Event:
    """One detection: at `round` (the window's first), on `signal`, with its `statistic`."""
    round: int
    window: int
    signal: str
    statistic: float


def _river_drift():
    try:
        from river import drift
    except ImportError:
        from privet.common.config import ConfigError

        raise ConfigError("drift.detector: needs the drift extra: pip install 'privet[drift]'"
                          ) from None
    return drift


class _Threshold:
    def __init__(self, limit: float, relative: bool) -> None:
        self.limit, self.relative, self.reference = limit, relative, None
        self.drift_detected = False

    def update(self, value: float) -> None:
        if self.reference is None:
            self.reference = value
        level = value - self.reference if self.relative else value
        self.drift_detected = level > self.limit


def _make(cfg: DriftConfig, signal: str):
    limit = cfg.detector_threshold if signal == "error_rate" else cfg.psi_threshold
    if cfg.detector == "threshold":
        return _Threshold(limit, relative=signal == "error_rate")
    drift = _river_drift()
    if cfg.detector == "adwin":
        return drift.ADWIN(delta=0.002, clock=1, min_window_length=2, grace_period=3)
    # δ: the change tolerated per window, a quarter of λ; 3 windows before it can fire
    return drift.PageHinkley(min_instances=3, delta=limit / 4, threshold=limit, mode="up")


@dataclass
class DriftMonitor:
    """The detectors of one run; `observe` feeds one window's signals. After a detection, or
    when the policy retrains, `restart` starts the detectors afresh (the model and the
    reference change)."""
    config: DriftConfig
    detectors: dict = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        self.detectors = {s: _make(self.config, s) for s in SIGNALS}

    def observe(self, server_round: int, window: int, values: dict[str, float]
                ) -> list[Event]:
        """Feed `values` ({signal: value}); the events they trigger (also kept in
        `events`). A signal missing from `values` (PSI before a reference) is skipped."""
        fired = []
        for signal, detector in self.detectors.items():
            if signal not in values:
                continue
            detector.update(float(values[signal]))
            if detector.drift_detected:
                fired.append(Event(server_round, window, signal, float(values[signal])))
        self.events.extend(fired)
        if fired:
            self.restart()
        return fired


def score(detection_rounds: list[int], true_rounds: list[int], horizon: int = 10,
          known: bool = True) -> tuple[int | None, int | None]:
    """(detection delay, false alarms) against the known drift rounds: the delay is the
    first detection at or after the first true drift round, minus that round (None when
    missed within `horizon` rounds); every other detection is a false alarm, except that
    repeated detections within the horizon of a true drift count as one. Where the truth is
    not `known` (a file without drift.drift-round), neither can be scored: (None, None)."""
    if not known:
        return None, None
    if not true_rounds:
        return None, len(detection_rounds)
    start = true_rounds[0]
    hits = [r for r in detection_rounds if start <= r < start + horizon]
    delay = hits[0] - start if hits else None
    false = [r for r in detection_rounds if r not in hits]
    return delay, len(false)
