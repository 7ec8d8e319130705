"""Writes the run directory as rounds finish: a callback, not part of the training loop."""

from __future__ import annotations

import logging
import math
import platform
import threading
import time
from importlib import metadata
from pathlib import Path

import torch
from flwr.app import Message

from common import records as R
from common import results
from common.config import ExperimentConfig
from common.plots import plot_run

log = logging.getLogger("flwr")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("flwr", "torch", "opacus", "dp-accounting", "numpy", "scikit-learn"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


class RunRecorder:
    def __init__(self, run_dir: Path, cfg: ExperimentConfig) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.started = time.time()
        self.client_rows: list[dict] = []
        self.round_rows: list[dict] = []
        self.clients: dict[str, dict] = {}  # client id -> latest ε, history, status
        self._pending: list[dict] = []
        self._lock = threading.Lock()
        self.user_strategy = None  # the UserLevelDPFedAvg, when user-level DP is on
        self.node_clients: dict[int, str] = {}  # node id -> the client it last answered for
        self.transform_features: int | None = None
        self.data_warnings: list[str] = []  # skipped lines, non-numeric cells in the files
        self.run_dir.mkdir(parents=True, exist_ok=True)
        results.atomic_write_text(self.run_dir / results.CONFIG, cfg.to_toml())

    def write_partitions(self, report: list[dict]) -> None:
        """The split over clients, in the run directory and the log."""
        if not report:
            return
        results.write_csv(self.run_dir / results.PARTITIONS, list(report[0]), report)
        labels = [k for k in report[0] if k.startswith("label=")]
        log.info("privet: partitions (%s): client rows %s missing-cells majority-share",
                 self.cfg.data.partition, " ".join(k[len("label="):] for k in labels))
        for row in report[:50]:
            log.info("privet:   %4d %7d %s %8d %.3f", row["client"], row["rows"],
                     " ".join(str(row[k]) for k in labels), row["missing-cells"],
                     row["majority-share"])
        if len(report) > 50:
            log.info("privet:   ... %d more in %s", len(report) - 50, results.PARTITIONS)

    def write_transform(self, transform) -> None:
        self.transform_features = len(transform.feature_names())
        results.atomic_write_text(self.run_dir / results.TRANSFORM, transform.to_json())

    def record_replies(self, server_round: int, replies: list[Message],
                       sent_to: dict[str, int] | None = None) -> None:
        """Per-client facts of one training round (called before aggregation).

        `sent_to` maps each outgoing message id to its node, so that an error reply the
        SuperLink wrote for a lost node is recorded under that node's client."""
        rows = []
        round_nodes: dict[str, int] = {}  # client id -> the node that answered for it
        for msg in replies:
            if msg.has_error():
                node = (sent_to or {}).get(msg.metadata.reply_to_message_id,
                                           msg.metadata.src_node_id)
                client = self.node_clients.get(node, f"node-{node}")
                rows.append({"round": server_round, "client": client,
                             "status": f"error: {msg.error.reason}"})
                continue
            m = msg.content["metrics"]
            client = str(int(m[R.CLIENT_ID]))
            self.node_clients[msg.metadata.src_node_id] = client
            node = round_nodes.setdefault(client, msg.metadata.src_node_id)
            if node != msg.metadata.src_node_id:  # a restarted node may come back as a new id
                raise RuntimeError(f"partition-id {client} is used by two nodes ({node} and "
                                   f"{msg.metadata.src_node_id}); each node needs its own")
            declined = bool(int(m.get(R.DECLINED, 0)))
            too_small = bool(int(m.get(R.TOO_SMALL, 0)))
            history = [[float(s), float(q), int(n)] for s, q, n in
                       zip(m.get(R.LEDGER_SIGMA, []), m.get(R.LEDGER_RATE, []),
                           m.get(R.LEDGER_STEPS, []))]
            entry = self.clients.setdefault(client, {"rounds_trained": 0, "stopped_round": None})
            entry.update(epsilon=float(m[R.EPSILON]), history=history,
                         target_epsilon=float(m.get(R.TARGET_EPSILON, math.nan)),
                         data={k[len(R.DATA_PREFIX):]: int(v) for k, v in m.items()
                               if k.startswith(R.DATA_PREFIX)})
            if too_small:
                entry["left_out"] = "too-small"
            elif declined:
                entry["stopped_round"] = entry["stopped_round"] or server_round
            else:
                entry["rounds_trained"] += 1
            rows.append({
                "round": server_round, "client": client,
                "status": "too-small" if too_small else "declined" if declined else "trained",
                "examples": int(m[R.NUM_EXAMPLES]),
                "loss": _fmt(m.get(R.TRAIN_LOSS)), "accuracy": _fmt(m.get(R.TRAIN_ACCURACY)),
                "epsilon": _fmt(m.get(R.EPSILON)), "steps": m.get(R.STEPS, 0),
                "noise_multiplier": _fmt(m.get(R.NOISE_MULTIPLIER)),
                "sample_rate": _fmt(m.get(R.SAMPLE_RATE)),
                "train_seconds": _fmt(m.get(R.TRAIN_SECONDS)),
                "accounting_seconds": _fmt(m.get(R.ACCOUNTING_SECONDS))})
        with self._lock:
            self._pending = sorted(rows, key=lambda r: str(r["client"]).zfill(8))
        errors = [msg.error.reason for msg in replies if msg.has_error()]
        if replies and len(errors) == len(replies):
            raise RuntimeError(f"round {server_round}: every sampled client failed; first "
                               f"error: {errors[0]}")

    def end_round(self, server_round: int, loss: float, accuracy: float,
                  state_dict: dict[str, torch.Tensor]) -> None:
        """After the global evaluation of a round: persist everything finished so far."""
        with self._lock:
            pending, self._pending = self._pending, []
        self.client_rows.extend(pending)
        trained = sum(r["status"] == "trained" for r in pending)
        declined = sum(r["status"] == "declined" for r in pending)
        self.round_rows.append({
            "round": server_round, "test_accuracy": f"{accuracy:.6f}",
            "test_loss": f"{loss:.6f}", "max_epsilon": _fmt(self.max_epsilon()),
            "user_epsilon": _fmt(self.user_epsilon()),
            "clients_trained": trained, "clients_declined": declined,
            "elapsed_seconds": f"{time.time() - self.started:.3f}"})
        results.write_csv(self.run_dir / results.METRICS, results.METRIC_COLUMNS,
                          self.client_rows)
        results.write_csv(self.run_dir / results.ROUNDS, results.ROUND_COLUMNS, self.round_rows)
        buffer = _torch_bytes({"round": server_round, "state_dict": state_dict})
        results.atomic_write_bytes(self.run_dir / results.MODEL, buffer)
        self.write_summary("running", server_round, accuracy, loss)

    def exhausted_clients(self) -> list[str]:
        """Clients that declined a round because their budget is spent."""
        return [cid for cid, c in self.clients.items() if c["stopped_round"] is not None]

    def left_out_clients(self) -> list[str]:
        """Clients whose data is too small to train on."""
        return [cid for cid, c in self.clients.items() if c.get("left_out")]

    def max_epsilon(self) -> float | None:
        """Largest sample-level ε over clients; None without sample-level DP."""
        if not self.cfg.private:
            return None
        return max((c["epsilon"] for c in self.clients.values()
                    if math.isfinite(c["epsilon"])), default=0.0)

    def user_epsilon(self) -> float | None:
        """User-level ε spent so far (composed over rounds, with sampling amplification)."""
        if self.user_strategy is None:
            return None
        return self.user_strategy.ledger.epsilon(self.cfg.privacy.delta,
                                                 self.cfg.privacy.accountant)

    def _user_level_summary(self) -> dict | None:
        s = self.user_strategy
        if s is None:
            return None
        return {"epsilon": self.user_epsilon(), "delta": self.cfg.privacy.delta,
                "target_epsilon": self.cfg.privacy.user_epsilon,
                "history": [list(entry) for entry in s.ledger.history],
                "clipping": self.cfg.privacy.user_clipping,
                "model_noise_multiplier": s.model_noise, "count_stddev": s.count_stddev,
                "clip_per_round": s.clip_history}

    def write_summary(self, status: str, completed: int | None = None,
                      accuracy: float | None = None, loss: float | None = None) -> None:
        last = self.round_rows[-1] if self.round_rows else {}
        if completed is None:
            completed = int(last.get("round", 0))
            accuracy = float(last["test_accuracy"]) if last else None
            loss = float(last["test_loss"]) if last else None
        privacy = self.cfg.privacy
        summary = {
            "name": self.cfg.name, "status": status, "accuracy": accuracy, "loss": loss,
            "rounds": completed, "planned_rounds": self.cfg.rounds,
            "wall_seconds": round(time.time() - self.started, 3), "seed": self.cfg.seed,
            "num_clients": self.cfg.num_clients,
            "clients_per_round": self.cfg.clients_per_round,
            "privacy": {
                "level": privacy.level if (self.cfg.private or self.cfg.user_level)
                else "none",
                "target_epsilon": privacy.epsilon if self.cfg.private else None,
                "delta": privacy.delta, "accountant": privacy.accountant,
                "max_grad_norm": privacy.max_grad_norm,
                "max_epsilon": self.max_epsilon(),
                "user_level": self._user_level_summary(),
                "clients": {cid: {"epsilon": c["epsilon"] if self.cfg.private else None,
                                  "target_epsilon": c.get("target_epsilon")
                                  if self.cfg.private else None,
                                  "history": c["history"],
                                  "rounds_trained": c["rounds_trained"],
                                  "stopped_round": c["stopped_round"],
                                  "left_out": c.get("left_out")}
                            for cid, c in self._sorted_clients()},
            },
            "data": {cid: c.get("data", {}) for cid, c in self._sorted_clients()},
            "data_warnings": self.data_warnings,
            "evaluation": self.cfg.evaluation.mode,
            "preprocess": {"fit": self.cfg.preprocess.fit,
                           "epsilon": self.cfg.preprocess.epsilon
                           if self.cfg.preprocess.fit == "federated" else None,
                           "features": self.transform_features},
            "versions": versions(),
        }
        results.write_json(self.run_dir / results.SUMMARY, summary)

    def _sorted_clients(self) -> list[tuple[str, dict]]:
        return sorted(self.clients.items(),
                      key=lambda kv: int(kv[0]) if kv[0].isdigit() else 1 << 30)

    def finish(self, status: str) -> None:
        self.write_summary(status)
        plot_run(self.run_dir)


def _fmt(value) -> str:
    if value is None:
        return ""
    value = float(value)
    return "inf" if math.isinf(value) else f"{value:.6g}"


def _torch_bytes(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
