"""Drift mode on the server: windows of new rows, monitored, detected, retrained.

Each round uses one window of rows (common.drift.streams). In a window's first round every
client first evaluates the current global model on its new rows and releases the noised
monitoring vector (clients.drift.monitor); the server sums them, reads the federated error
rate and each feature's PSI against the reference window, and feeds the detectors
(common.drift.detect). The retraining policy (common.drift.policy) then says whether the
round trains; a training round samples `clients-per-round` clients, runs DP-SGD on their
window (clients.drift.train) and averages the replies (FedAvg, McMahan et al. 2017;
uniform, or by rows with strategy.weighting = "examples"). Finally the model is scored on
held-out rows of the newest window (the simulation's oracle) next to the majority-class
baseline.

Writes drift.csv (one row per round, atomically after each), summary.json (with the `drift`
block: true drift rounds, detections, retrains, detection delay, false alarms, ε per window)
and drift.png (accuracy over time with the true drift, the detections and the retrains).
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from privet.common import records as R
from privet.common import results
from privet.common.config import ExperimentConfig
from privet.common.drift import accounting as drift_accounting
from privet.common.drift import signals, streams
from privet.common.drift.detect import DriftMonitor, score
from privet.common.drift.policy import RetrainPolicy
from privet.common.evaluation import logits
from privet.common.models import build_model
from privet.common.privacy import accountants
from privet.server.queries import TIMEOUT_SECONDS

log = logging.getLogger("flwr")
DRIFT_CSV = "drift.csv"
DRIFT_PLOT = "drift.png"
COLUMNS = ["round", "window", "new_window", "error_rate", "loss", "psi", "psi_feature",
           "detected", "signal", "retrained", "trained", "reset", "clients_trained",
           "accuracy", "majority", "window_epsilon"]


class DriftRunFailed(RuntimeError):
    """A drift run could not go on (a client failed its monitoring): one line."""


def _messages(nodes, arrays: ArrayRecord, config: dict, message_type: str):
    record = ConfigRecord(config)
    return [Message(RecordDict({"arrays": arrays, "config": record}), dst_node_id=node,
                    message_type=message_type) for node in nodes]


def _ask(grid: Grid, nodes, arrays, config, message_type) -> tuple[list[Message], list[str]]:
    replies = list(grid.send_and_receive(_messages(nodes, arrays, config, message_type),
                                         timeout=TIMEOUT_SECONDS))
    failed = [r.error.reason for r in replies if r.has_error()]
    good = [r for r in replies if not r.has_error()]
    for reply in good:  # a client's own failure reply (clients.app._failures_named)
        if R.FAILURE in reply.content.config_records:
            failed.append(str(reply.content[R.FAILURE]["reason"]))
    good = [r for r in good if R.FAILURE not in r.content.config_records]
    if len(replies) < len(nodes):
        failed.append(f"{len(nodes) - len(replies)} client(s) sent no reply in time")
    return good, failed


def _fedavg(replies: list[Message], by_rows: bool) -> ArrayRecord | None:
    """The mean of the replies' arrays (FedAvg), weighted by each client's rows (`by_rows`,
    strategy.weighting = "examples") or uniform; None without any."""
    kept = [(r.content["arrays"], float(r.content["metrics"][R.NUM_EXAMPLES]) if by_rows
             else 1.0) for r in replies
            if "arrays" in r.content.array_records and
            float(r.content["metrics"][R.NUM_EXAMPLES]) > 0]
    if not kept:
        return None
    total = sum(w for _, w in kept)
    names = list(kept[0][0].keys())
    mean = {name: sum(a[name].numpy() * (w / total) for a, w in kept) for name in names}
    return ArrayRecord({name: torch.from_numpy(np.asarray(v, dtype=kept[0][0][name].numpy()
                                                          .dtype)) for name, v in mean.items()})


def _score(cfg: ExperimentConfig, model: torch.nn.Module, window: int) -> tuple[float, float]:
    """(accuracy, majority-class accuracy) on every client's held-out rows of `window`."""
    parts = [streams.window(cfg, c, window, "test") for c in range(cfg.num_clients)]
    x = np.concatenate([p.features for p in parts])
    y = np.concatenate([p.labels for p in parts])
    if not len(y):
        return math.nan, math.nan
    predicted = logits(model, streams.model_input(x)).argmax(1).numpy()
    majority = np.bincount(y).max() / len(y)
    return float((predicted == y).mean()), float(majority)


class DriftRecorder:
    """drift.csv, summary.json and the plot of one drift run (the side effects of a round)."""

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, run: str) -> None:
        self.run_dir, self.cfg, self.run = run_dir, cfg, run
        self.rows: list[dict] = []
        self.window_epsilon: dict[int, float] = {}
        self.failures: dict[str, str] = {}
        self.spends: dict[tuple[int, int], list] = {}  # (client, window) -> its spends
        self.started = time.time()
        self.across_windows: float | None = None
        self.monitor = DriftMonitor(cfg.drift)  # its events: the detections so far
        self.retrains: list[int] = []

    def read_ledgers(self) -> None:
        """ε per window and across windows from the window ledgers in the run directory,
        where the clients keep them (a round stopped in flight was paid before it ran: its
        reply never came, its ledger has it); composing all windows takes seconds."""
        from privet.clients.drift import ledgers_root  # where clients write them

        root = Path(ledgers_root(str(self.run_dir)))
        for path in sorted(root.glob("client-*/window-*.json")):
            client = int(path.parent.name.split("-")[1])
            window = int(path.stem.split("-")[1])
            records = json.loads(path.read_text(encoding="utf-8"))
            spends = [s for record in records for s in record["spends"]]
            self.spends[(client, window)] = spends
            eps = accountants.epsilon([tuple(s[:3]) for s in spends], self.cfg.privacy.delta,
                                      self.cfg.privacy.accountant)
            self.window_epsilon[window] = max(self.window_epsilon.get(window, 0.0), eps)
        self.across_windows = self.epsilon_across_windows()

    def epsilon_across_windows(self) -> float:
        """The largest ε over clients of composing all their windows' spends: what one
        person with one row in every window of a client has spent (PLD by default)."""
        worst = 0.0
        for client in {c for c, _ in self.spends}:
            history = [tuple(s[:3]) for (c, _), spends in sorted(self.spends.items())
                       if c == client for s in spends]
            worst = max(worst, accountants.epsilon(history, self.cfg.privacy.delta,
                                                   self.cfg.privacy.accountant))
        return worst

    def spent(self, window: int, replies: list[Message]) -> None:
        for reply in replies:
            if R.PRIVACY in reply.content.config_records:
                client = int(reply.content["metrics"][R.CLIENT_ID])
                self.spends[(client, window)] = json.loads(
                    str(reply.content[R.PRIVACY][R.LEDGER]))
            eps = reply.content["metrics"].get(R.EPSILON)
            if eps is not None and math.isfinite(float(eps)):
                self.window_epsilon[window] = max(self.window_epsilon.get(window, 0.0),
                                                  float(eps))

    def end_round(self, row: dict) -> None:
        self.rows.append(row)
        results.write_csv(self.run_dir / DRIFT_CSV, COLUMNS, self.rows)
        self.write_summary("running")

    def drift_block(self) -> dict:
        """summary.json's `drift`: the true drift, the detections and retrains so far."""
        monitor, retrains = self.monitor, self.retrains
        true_rounds = streams.true_drift_rounds(self.cfg)
        detections = sorted({e.round for e in monitor.events})
        delay, false_alarms = score(detections, true_rounds,
                                    known=streams.drift_known(self.cfg))
        return {"true_drift_rounds": true_rounds,
                "detections": [vars(e) for e in monitor.events],
                "retrains": retrains, "detection_delay": delay, "false_alarms": false_alarms,
                "drifted_clients": list(streams.drifted_clients(self.cfg))
                if self.cfg.drift.source in streams.GENERATORS + ("adult",) else None,
                "width_rounds": self.cfg.drift.width * self.cfg.drift.rounds_per_window,
                "policy": self.cfg.drift.policy, "retrain": self.cfg.drift.retrain,
                "detector": self.cfg.drift.detector, "source": self.cfg.drift.source}

    def not_covered(self) -> list[str]:
        """What no ε of this run covers (also printed at its end)."""
        lines = ["the held-out rows the server scores the model on (the simulation's oracle "
                 "of each window) are read in the clear"]
        if self.cfg.drift.source not in streams.GENERATORS:
            lines.append("runs again on the same rows compose with this one: each window's "
                         "ε here covers this run only (privacy.ledger-dir is not supported "
                         "in drift mode yet)")
        if self.cfg.drift.source in ("csv", "parquet"):
            lines.append("each client's row count per window: a training reply carries it "
                         "(its examples, and DP-SGD's sample rate and steps follow from it)")
        lines.append("a participant's rows across windows: ε is per window (event level), "
                     "not per participant over time")
        return lines

    def write_summary(self, status: str) -> None:
        from privet.server.recorder import versions

        cfg = self.cfg
        last = self.rows[-1] if self.rows else {}
        eps = [self.window_epsilon[w] for w in sorted(self.window_epsilon)]
        summary = {
            "name": cfg.name, "mode": "drift", "status": status, "run_id": self.run,
            "rounds": len(self.rows),
            "planned_rounds": cfg.rounds, "num_clients": cfg.num_clients, "seed": cfg.seed,
            "wall_seconds": time.time() - self.started,
            "accuracy": last.get("accuracy", math.nan),
            "privacy": {"level": cfg.privacy.level, "guarantee": "event-level over time: one "
                        "row of one window, against the server and whoever sees the models "
                        "and signals", "epsilon_per_window_target": cfg.privacy.epsilon,
                        "delta": cfg.privacy.delta, "accountant": cfg.privacy.accountant,
                        "monitor_noise": cfg.drift.monitor_noise,
                        "monitor_epsilon": drift_accounting.monitor_epsilon(cfg)
                        if cfg.private else None,
                        "epsilon_per_window": {str(w): e for w, e in
                                               sorted(self.window_epsilon.items())},
                        "max_window_epsilon": max(eps) if eps else 0.0,
                        "epsilon_one_row_every_window": self.across_windows,
                        "not_covered": self.not_covered()},
            "failures": {"clients": self.failures},
            "drift": self.drift_block(),
            "versions": versions()}
        results.write_json(self.run_dir / results.SUMMARY, summary)


def run_drift(grid: Grid, cfg: ExperimentConfig, run_dir: Path, run: str,
              recorder: DriftRecorder) -> None:
    """All rounds of a drift run; the recorder holds what was done when this raises."""
    drift_accounting.check(cfg)
    nodes = sorted(grid.get_node_ids())
    names = streams.feature_names(cfg)
    d = len(names)
    bins = cfg.drift.monitor_bins
    model = build_model(cfg.train, (d,), streams.num_classes(cfg))
    arrays = R.to_arrays(model)
    monitor, retrains = recorder.monitor, recorder.retrains
    policy = RetrainPolicy(cfg.drift, cfg.drift.rounds_per_window)
    sampler = random.Random(cfg.seed)
    reference = None
    window_signals = None
    for server_round in range(1, cfg.rounds + 1):
        window = streams.window_of(cfg, server_round)
        new_window = server_round == streams.first_round(cfg, window)
        config = {"server-round": server_round, "window": window, R.RUN: run}
        events, psi, psi_feature = [], math.nan, ""
        if new_window:
            replies, failed = _ask(grid, nodes, arrays, config, "query.drift_monitor")
            if failed:
                raise DriftRunFailed(f"monitoring window {window}: {len(failed)} client(s) "
                                     f"failed: {failed[0]}")
            recorder.spent(window, replies)
            vectors = [r.content["monitor"]["vector"].numpy() for r in replies]
            noise_std = (cfg.drift.monitor_noise * signals.sensitivity(d)
                         * math.sqrt(len(vectors)) if cfg.private else 0.0)
            window_signals = signals.combine(vectors, d, bins, noise_std)
            if reference is None:
                reference = window_signals
            per_feature = window_signals.psi(reference)
            psi = float(per_feature.max())
            psi_feature = names[int(per_feature.argmax())]
            if server_round > cfg.drift.warmup_rounds:  # the model is in use: watch it
                events = monitor.observe(server_round, window,
                                         {"error_rate": window_signals.error_rate, "psi": psi})
        decision = policy.decide(server_round, window, new_window, bool(events))
        if decision.reset:
            torch.manual_seed(cfg.seed + server_round)
            model = build_model(cfg.train, (d,), streams.num_classes(cfg))
            arrays = R.to_arrays(model)
        if decision.retrain:
            retrains.append(server_round)
            if window_signals is not None:
                reference = window_signals  # released with this window: post-processing
            monitor.restart()
        trained = 0
        if decision.train:
            chosen = sampler.sample(nodes, min(cfg.clients_per_round, len(nodes)))
            replies, failed = _ask(grid, chosen, arrays, config, "train.drift")
            for reason in failed:
                recorder.failures.setdefault(f"round {server_round}", reason)
            recorder.spent(window, replies)
            averaged = _fedavg(replies, cfg.strategy.weighting == "examples")
            trained = sum(int(float(r.content["metrics"].get(R.NUM_EXAMPLES, 0)) > 0)
                          for r in replies)
            if averaged is not None:
                arrays = averaged
            if not trained:
                log.warning("privet: round %d: no client trained (a window needs at least "
                            "train.batch-size = %d rows); the model is unchanged",
                            server_round, cfg.train.batch_size)
        R.load_arrays(model, arrays)
        accuracy, majority = _score(cfg, model, window)
        row = {"round": server_round, "window": window, "new_window": int(new_window),
               "error_rate": window_signals.error_rate if new_window else "",
               "loss": window_signals.loss if new_window else "",
               "psi": psi if new_window else "",
               "psi_feature": psi_feature, "detected": int(bool(events)),
               "signal": "+".join(e.signal for e in events),
               "retrained": int(decision.retrain), "trained": int(trained > 0),
               "reset": int(decision.reset), "clients_trained": trained,
               "accuracy": accuracy, "majority": majority,
               "window_epsilon": recorder.window_epsilon.get(window, 0.0)}
        recorder.end_round(row)
        log.info("privet: round %d/%d window %d: accuracy %.4f (majority %.4f)%s%s%s",
                 server_round, cfg.rounds, window, accuracy, majority,
                 f", error rate {window_signals.error_rate:.3f}, PSI {psi:.3f}"
                 if new_window else "",
                 f", drift detected ({row['signal']})" if events else "",
                 ", retraining" if decision.retrain else "")


def _draw(run_dir: Path, rows: list[dict], drift: dict) -> None:
    """drift.png: accuracy on the newest window per round, the majority baseline, the true
    drift (red band), detections (orange ▼), the rounds that trained (green ticks) and the
    retraining starts (green ▲)."""
    from privet.common.plots import _pyplot

    plt, _ = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 4))
    rounds = [int(r["round"]) for r in rows]  # (numbers, or text read back from drift.csv)
    ax.plot(rounds, [float(r["accuracy"]) for r in rows], label="accuracy (newest window)")
    ax.plot(rounds, [float(r["majority"]) for r in rows], ":", color="grey",
            label="majority class")
    width = drift.get("width_rounds") or 0
    for i, r in enumerate(drift["true_drift_rounds"]):
        label = "true drift" if i == 0 else None
        if width:  # a gradual drift: the band spans its windows
            ax.axvspan(r, r + width, color="red", alpha=0.15, label=label)
        else:
            ax.axvline(r, color="red", lw=4, alpha=0.35, label=label)
    found = [e["round"] for e in drift["detections"]]
    ax.plot(found, [0.97] * len(found), "v", color="darkorange", ms=9, ls="none",
            label="detection" if found else None)
    trained = [int(r["round"]) for r in rows if int(r["trained"])]
    ax.plot(trained, [0.03] * len(trained), "|", color="green", ms=8, ls="none",
            label="trained" if trained else None)
    ax.plot(drift["retrains"], [0.08] * len(drift["retrains"]), "^", color="green", ms=8,
            ls="none", label="retraining starts" if drift["retrains"] else None)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / DRIFT_PLOT, dpi=100)
    plt.close(fig)


def main(grid: Grid, cfg: ExperimentConfig, run_dir: Path, run: str, deployed: bool) -> None:
    """The ServerApp's drift run: statuses as the ServerApp's (complete, complete-with-
    failures, failed, interrupted). Raises RunFailed-like DriftRunFailed in one line."""
    if deployed:
        raise DriftRunFailed("drift mode runs in simulation only for now (privet simulate): a "
                             "deployed node would need the window schedule of its own data")
    recorder = DriftRecorder(run_dir, cfg, run)
    status = "failed"
    try:
        run_drift(grid, cfg, run_dir, run, recorder)
        status = "complete-with-failures" if recorder.failures else "complete"
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        if cfg.private:  # what the ledgers hold: also a round in flight when it stopped
            try:
                recorder.read_ledgers()
            except (OSError, ValueError) as error:
                log.warning("privet: could not read the window ledgers: %s", error)
        try:
            recorder.write_summary(status)
            if recorder.rows:  # also for a run stopped part-way: what it did
                _draw(run_dir, recorder.rows, recorder.drift_block())
        except OSError as error:
            log.warning("privet: could not write the final summary: %s", error)
        log.info("privet: %s after %d round(s); results in %s", status, len(recorder.rows),
                 run_dir)
