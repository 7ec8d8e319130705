"""Writes the run directory as rounds finish: a callback, not part of the training loop."""

from __future__ import annotations

import functools
import json
import logging
import math
import platform
import threading
import time
import weakref
from importlib import metadata
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Message

from privet import patches
from privet.common import records as R
from privet.common import results
from privet.common.config import SHIPPED_DATASETS, ExperimentConfig, shaped
from privet.common.data import adult
from privet.common.data.target import target_scale
from privet.common.device import device_name
from privet.common.evaluation import RegressionScores, Scores
from privet.common import plots
from privet.common.run_dir import claim as run_dir_claim
from privet.common.privacy import accountants
from privet.server.tracking import Tracking

log = logging.getLogger("flwr")


SUMMARY_EVERY_SECONDS = 1.0  # while running; see RunRecorder.end_round


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("flwr", "torch", "opacus", "dp-accounting", "numpy", "scikit-learn"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def _locked(method):
    """Run `method` under the recorder's write lock (see RunRecorder.__init__)."""
    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._write_lock:
            return method(self, *args, **kwargs)
    return locked


class RunRecorder:
    """Writes a run's directory as it goes (see the module doc). `restored`: the state a
    checkpoint kept (`state_dict`), for a resumed run: its rows and per-client facts go on
    from there, and rounds.csv and metrics.csv are rewritten to end at its round (a round
    written after the checkpoint is done again)."""

    # what a checkpoint keeps: everything the rows, the summary and the stop rules read
    STATE = ("client_rows", "round_rows", "clients", "spend", "released",
             "client_transforms", "client_ranges", "failures", "failed_nodes",
             "node_clients", "transform_features", "estimated_bounds", "data_warnings",
             "classes", "server_device")

    def __init__(self, run_dir: Path, cfg: ExperimentConfig, *, run: str = "",
                 noise_source: str = "seeded", restored: dict | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        self.run, self.noise_source = run, noise_source
        self.started = time.time()
        self._summary_due = 0.0  # perf_counter time before which a round skips summary.json
        self.client_rows: list[dict] = []
        self.round_rows: list[dict] = []
        self.clients: dict[str, dict] = {}  # client id -> latest ε, history, status
        self._pending: list[dict] = []
        self._lock = threading.Lock()
        # what the ServerApp's thread records and what mark_ended writes from the main
        # thread (Ctrl-C, SIGTERM) take turns: an interrupted run's summary is its last round
        self._write_lock = threading.RLock()
        self._key = self.run_dir.resolve()  # how _LIVE and _ENDED name this run
        _LIVE[self._key] = weakref.ref(self)
        self.user_strategy = None  # the UserLevelDPFedAvg, when user-level DP is on
        self.user_ledger = None    # its participants' ledger over runs (server.accounting)
        # client id -> what it reported spending (common.privacy.ledger.DataLedger.report)
        self.spend: dict[str, dict] = {}
        self.released: dict[str, set[str]] = {}  # client id -> what it sent in the clear
        self.client_transforms: dict[str, str] = {}  # client id -> its own DP-fitted transform
        self.client_ranges: dict[str, dict] = {}  # fit = local: ranges each estimated, DP
        self.failures: dict[str, dict] = {}  # client id -> its first failure (round, reason)
        self.stop_reason: str | None = None  # why the run ended early (budget-exhausted)
        self.failed_nodes: set[int] = set()  # nodes whose client failed before round 1
        self.node_clients: dict[int, str] = {}  # node id -> the client it last answered for
        self.transform_features: int | None = None
        self.estimated_bounds: dict = {}  # ranges of undeclared numeric columns, found with DP
        self.data_warnings: list[str] = []  # skipped lines, non-numeric cells in the files
        self.classes: list[str] = []  # the model's outputs, in order
        self.server_device: str | None = None  # where the server evaluates ("cpu", "cuda:0")
        # privet simulate claimed it already (a no-op then); a deployed ServerApp claims it
        if restored is None:
            run_dir_claim(self.run_dir, option="out-dir", finished=results.SUMMARY,
                          stale=results.RUN_FILES)
            results.atomic_write_text(self.run_dir / results.CONFIG, cfg.to_toml())
        else:  # the same run goes on: nothing of it is cleared
            run_dir_claim(self.run_dir, option="out-dir")
            self.load_state_dict(restored)
        # headers now: a run that ends before round 1 still leaves files a program can read
        results.write_csv(self.run_dir / results.METRICS, self.metric_columns, self.client_rows)
        results.write_csv(self.run_dir / results.ROUNDS, self.round_columns, self.round_rows)
        # [tracking]: MLflow, TensorBoard (server.tracking); callbacks, empty when not asked
        self.tracking = Tracking.for_run(cfg, self.run_dir, run, self.started)

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the recorder (plain data, not copied: pickle it before
        the next round changes it), with the seconds run so far."""
        return {**{name: getattr(self, name) for name in self.STATE},
                "elapsed": time.time() - self.started}

    def load_state_dict(self, state: dict) -> None:
        for name in self.STATE:
            setattr(self, name, state[name])
        self.started = time.time() - float(state["elapsed"])  # wall time: both parts

    @property
    def metric_columns(self) -> list[str]:
        return results.metric_columns(self.cfg.regression)

    @property
    def round_columns(self) -> list[str]:
        return results.round_columns(self.cfg.regression)

    def write_partitions(self, report: list[dict]) -> None:
        """The split over clients, in the run directory and the log."""
        if not report:
            return
        results.write_csv(self.run_dir / results.PARTITIONS, list(report[0]), report)
        if "label-mean" in report[0]:  # regression: the label's mean and spread per client
            log.info("privet: partitions (%s): client rows label-mean label-std "
                     "missing-cells", self.cfg.data.partition)
            for row in report[:50]:
                log.info("privet:   %4d %7d %s %s %8d", row["client"], row["rows"],
                         row["label-mean"], row["label-std"], row["missing-cells"])
            return
        labels = [k for k in report[0] if k.startswith("label=")]
        log.info("privet: partitions (%s): client rows %s missing-cells majority-share",
                 self.cfg.data.partition, " ".join(k[len("label="):] for k in labels))
        for row in report[:50]:
            log.info("privet:   %4d %7d %s %8d %.3f", row["client"], row["rows"],
                     " ".join(str(row[k]) for k in labels), row["missing-cells"],
                     row["majority-share"])
        if len(report) > 50:
            log.info("privet:   ... %d more in %s", len(report) - 50, results.PARTITIONS)

    def record_statistics(self, client: str, msg: Message) -> None:
        """A client's reply to a preprocessing statistics query: what it spent, and whether
        it declined (no budget left: it stops before round 1, `stopped_round` 0)."""
        self.record_spend(client, msg.content.config_records.get(R.PRIVACY))
        entry = self.clients.setdefault(client, {"rounds_trained": 0, "stopped_round": None})
        if self.note_failure(client, msg, 0, "preprocessing"):
            self.failed_nodes.add(msg.metadata.src_node_id)  # never sampled to train
            return
        if int(msg.content["metrics"].get(R.DECLINED, 0)) and entry["stopped_round"] is None:
            entry["stopped_round"] = 0

    def record_spend(self, client: str, privacy: ConfigRecord | None) -> None:
        """What a client's reply says it has spent (every reply of a client that may have
        spent carries it: statistics, training, evaluation)."""
        if privacy is None or R.LEDGER not in privacy:
            return
        report = json.loads(str(privacy[R.LEDGER]))
        transform = report.pop("transform", "")
        if transform and self.client_transforms.get(client) != transform:
            self.client_transforms[client] = transform
            declared = set(shaped(self.cfg.data.bounds, {}))
            if self.cfg.data.dataset == "adult":
                declared |= set(adult.BOUNDS)
            ranges = {step["column"]: [step["clip_low"], step["clip_high"]]
                      for step in json.loads(transform)["numeric"]
                      if step["column"] not in declared and step["clip_low"] is not None}
            if ranges:
                self.client_ranges[client] = ranges
            results.write_json(self.run_dir / results.CLIENT_TRANSFORMS,
                               {c: json.loads(t) for c, t in self.client_transforms.items()})
        self.spend[client] = report
        self.clients.setdefault(client, {"rounds_trained": 0, "stopped_round": None})

    def _released(self, client: str, keys) -> None:
        noised = self.cfg.metrics_noised(int(client)) if client.isdigit() else False
        # noised: inside its ε; the DP-SGD path and the device depend on the model and the
        # machine only
        covered = {R.CLIENT_ID, R.DP_PATH, R.DEVICE, *(R.AVERAGED if noised else ())}
        self.released.setdefault(client, set()).update(
            "cleaning counts" if k.startswith(R.DATA_PREFIX) else k
            for k in keys if k not in covered)

    def record_evaluations(self, server_round: int, replies: list[Message]) -> None:
        """Federated evaluation: what each client sent (metrics in the clear), spent, or
        failed at."""
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content:
                continue
            client = str(int(msg.content["metrics"][R.CLIENT_ID]))
            self._released(client, msg.content["metrics"].keys())
            self.record_spend(client, msg.content.config_records.get(R.PRIVACY))
            self.note_failure(client, msg, server_round, "evaluation")

    def note_failure(self, client: str, msg: Message, server_round: int,
                     stage: str = "training") -> str:
        """The reason a client's reply says it failed ("" if it did not), kept for the
        summary: the first failure of each client, with its round and stage."""
        failure = msg.content.config_records.get(R.FAILURE)
        if not int(msg.content["metrics"].get(R.FAILED, 0)) or failure is None:
            return ""
        reason = str(failure.get("reason", "unknown"))
        if client not in self.failures:
            self.failures[client] = {"round": server_round, "stage": stage, "reason": reason}
            entry = self.clients.setdefault(client, {"rounds_trained": 0, "stopped_round": None})
            entry["left_out"] = "failed"
        return reason

    def note_described(self, report: list[dict]) -> None:
        """Federated evaluation: every client described its data in the clear."""
        for row in report:
            self._released(str(row["client"]),
                           ["rows", "label counts", "missing cells"])

    def write_model_spec(self, spec) -> None:
        """model.json (common.saved_model.ModelSpec): what model.pt takes and gives, so that
        the run directory alone rebuilds the model and encodes new rows."""
        results.atomic_write_text(self.run_dir / results.MODEL_SPEC, spec.to_json())

    def write_transform(self, transform, estimated_bounds: dict | None = None) -> None:
        self.transform_features = len(transform.feature_names())
        self.estimated_bounds = dict(estimated_bounds or {})
        results.atomic_write_text(self.run_dir / results.TRANSFORM, transform.to_json())

    @_locked
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
            self._released(client, m.keys())
            self.record_spend(client, msg.content.config_records.get(R.PRIVACY))
            node = round_nodes.setdefault(client, msg.metadata.src_node_id)
            if node != msg.metadata.src_node_id:  # a restarted node may come back as a new id
                raise RuntimeError(f"partition-id {client} is used by two nodes ({node} and "
                                   f"{msg.metadata.src_node_id}); each node needs its own")
            declined = bool(int(m.get(R.DECLINED, 0)))
            too_small = bool(int(m.get(R.TOO_SMALL, 0)))
            failure = self.note_failure(client, msg, server_round)
            entry = self.clients.setdefault(client, {"rounds_trained": 0, "stopped_round": None})
            entry.update(target_epsilon=float(m.get(R.TARGET_EPSILON, math.nan)))
            if any(k.startswith(R.DATA_PREFIX) for k in m.keys()):
                entry["data"] = {k[len(R.DATA_PREFIX):]: int(v) for k, v in m.items()
                                 if k.startswith(R.DATA_PREFIX)}
            if R.DP_PATH in m:
                entry["dp_path"] = R.DP_PATHS[int(m[R.DP_PATH])]
            if R.DEVICE in m:
                entry["device"] = device_name(m[R.DEVICE])
            if failure:
                entry["left_out"] = "failed"
            elif too_small:
                entry["left_out"] = "too-small"
            elif declined:
                entry["stopped_round"] = entry["stopped_round"] or server_round
            else:
                entry["rounds_trained"] += 1
            rows.append({
                "round": server_round, "client": client,
                "status": f"failed: {failure}" if failure else "too-small" if too_small
                else "declined" if declined else "trained",
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

    @_locked
    def end_round(self, server_round: int, scores: Scores | RegressionScores,
                  state_dict: dict[str, torch.Tensor]) -> None:
        """After the global evaluation of a round: persist everything finished so far.
        Nothing once the run has been marked ended (mark_ended: Ctrl-C, SIGTERM): its files
        and summary stay those of the last round before, which the ServerApp's thread may
        otherwise still add to while the process stops."""
        if self._key in _ENDED:
            return
        loss = scores.loss
        accuracy = scores.accuracy if isinstance(scores, Scores) else None
        with self._lock:
            pending, self._pending = self._pending, []
        self.client_rows.extend(pending)
        trained = sum(r["status"] == "trained" for r in pending)
        declined = sum(r["status"] == "declined" for r in pending)
        failed = sum(r["status"].startswith(("failed", "error")) for r in pending)
        if not trained:
            log.warning("privet: round %d: no client trained (%d declined, %d failed, %d "
                        "left out); the global model is unchanged", server_round, declined,
                        failed, sum(r["status"] == "too-small" for r in pending))
        if isinstance(scores, RegressionScores):
            measured = {"test_rmse": _fmt(scores.rmse), "test_mae": _fmt(scores.mae),
                        "test_r2": _fmt(scores.r2), "test_loss": f"{loss:.6f}",
                        "baseline_rmse": _fmt(scores.baseline_rmse),
                        "baseline_mae": _fmt(scores.baseline_mae)}
        else:
            measured = {"test_accuracy": f"{accuracy:.6f}", "test_loss": f"{loss:.6f}",
                        **{f"test_{k}": _fmt(v) for k, v in scores.as_dict().items()
                           if k not in ("loss", "accuracy", "majority")},
                        "majority_baseline": _fmt(scores.majority)}
        self.round_rows.append({
            "round": server_round, **measured,
            "max_epsilon": _fmt(self.max_epsilon()),
            "user_epsilon": _fmt(self.user_epsilon()),
            "clients_trained": trained, "clients_declined": declined,
            "clients_failed": failed,
            "elapsed_seconds": f"{time.time() - self.started:.3f}"})
        # atomic, not fsynced each round (~2 ms a file): a killed run's files are whole;
        # finish() syncs them
        results.write_csv(self.run_dir / results.METRICS, self.metric_columns, self.client_rows,
                          durable=False)
        results.write_csv(self.run_dir / results.ROUNDS, self.round_columns, self.round_rows,
                          durable=False)
        self.tracking.round_end(server_round, self.round_rows[-1])
        buffer = _torch_bytes({"round": server_round, "state_dict": state_dict})
        results.atomic_write_bytes(self.run_dir / results.MODEL, buffer, durable=False)
        # summary.json grows with the clients that trained (5,000 of them by round 50 of the
        # cross-device config: ~0.3 s a write). While running it is rewritten after a round
        # at most once a second, and not until 20x its last write's time has passed (at most
        # ~5% of the run); rounds.csv, metrics.csv and model.pt are always current, and the
        # end of the run (complete, stopped, interrupted, failed) always writes it.
        began = time.perf_counter()
        if began >= self._summary_due:
            self.write_summary("running", server_round, accuracy, loss)
            self._summary_due = began + max(SUMMARY_EVERY_SECONDS,
                                            20 * (time.perf_counter() - began))

    @_locked
    def checkpoint(self, make) -> bool:
        """Write the checkpoint `make(self.state_dict())` returns (server.checkpoint) into the
        run directory, unless the run has been marked ended (its files then stay those of
        the round before, and so does the checkpoint). True when written."""
        if self._key in _ENDED:
            return False
        make(self.state_dict()).save(self.run_dir)
        return True

    def exhausted_clients(self) -> list[str]:
        """Clients that declined a round because their budget is spent."""
        return [cid for cid, c in self.clients.items() if c["stopped_round"] is not None]

    def left_out_clients(self) -> list[str]:
        """Clients whose data is too small to train on, or that failed."""
        return [cid for cid, c in self.clients.items() if c.get("left_out")]

    def max_epsilon(self) -> float | None:
        """Largest sample-level ε over clients; None without sample-level DP."""
        if not self.cfg.private:
            return None
        return max((r["epsilon"] for c, r in self.spend.items()
                    if self.cfg.client_private(int(c)) and r["epsilon"] is not None
                    and math.isfinite(r["epsilon"])), default=0.0)

    def user_epsilon(self) -> float | None:
        """User-level ε spent so far (composed over rounds, with sampling amplification)."""
        if self.user_ledger is None:
            return None
        return self.user_ledger.epsilon(self.cfg.privacy.delta, self.cfg.privacy.accountant)

    def _user_level_summary(self) -> dict | None:
        s, ledger = self.user_strategy, self.user_ledger
        if ledger is None:
            return None
        p = self.cfg.privacy
        worst = ledger.worst(p.delta, p.accountant)
        summary = {"epsilon": self.user_epsilon(), "delta": p.delta,
                   "target_epsilon": p.user_epsilon,
                   "history": [list(x.as_entry()) for x in worst],
                   "this_run": [x.to_list() for x in ledger.current.spends],
                   "earlier_runs_epsilon": ledger.prior_epsilon(p.delta, p.accountant),
                   "ledger": ledger.location, "noise_source": self.noise_source,
                   "clipping": p.user_clipping}
        if s is not None:
            summary.update(model_noise_multiplier=s.model_noise, count_stddev=s.count_stddev,
                           count_sensitivity=getattr(s, "count_sensitivity", None)
                           if s.adaptive else None,
                           clip_per_round=s.clip_history)
        return summary

    def _client_summary(self, cid: str, c: dict, final: bool) -> dict:
        """A client's rounds and, if it spent anything, what on, from its own report; the ε
        of each purpose alone (`spent_on`) in the final summary only (an ε query each, every
        round otherwise; `purposes` says the same while the run goes)."""
        report = self.spend.get(cid)
        out = {"rounds_trained": c["rounds_trained"], "stopped_round": c["stopped_round"],
               "left_out": c.get("left_out"),
               "target_epsilon": c.get("target_epsilon") if self.cfg.private else None,
               "dp_path": c.get("dp_path"), "device": c.get("device"),
               "epsilon": None, "history": [], "spent_on": {}}
        if report is None:
            return out
        history = report["history"]
        delta, accountant = self.cfg.privacy.delta, self.cfg.privacy.accountant
        by_purpose: dict[str, list] = {}
        for entry in history:
            by_purpose.setdefault(entry[3], []).append(entry[:3])
        out.update(
            epsilon=report["epsilon"] if history or self.cfg.client_private(int(cid)) else None,
            history=[entry[:3] for entry in history],
            purposes=[entry[3] for entry in history],
            spent_on={purpose: accountants.epsilon(h, delta, accountant) if final else None
                      for purpose, h in by_purpose.items()},
            this_run=report["run_spends"],
            earlier_runs_epsilon=report["prior_epsilon"],
            noise_source=report["noise_source"],
            ledger={"location": report["ledger"], "record": report["record"]})
        if out["target_epsilon"] is None and self.cfg.client_private(int(cid)):
            out["target_epsilon"] = self.cfg.epsilon_for(int(cid))
        return out

    def not_covered(self) -> list[str]:
        """What no ε covers in this run, said in its output (summary.json, console)."""
        cfg = self.cfg
        lines = []
        if not (cfg.private or cfg.user_level):
            lines.append("no differential privacy: privacy.level = \"none\" (or ε = inf)")
        if self.noise_source == "seeded" and (cfg.private or cfg.user_level):
            lines.append("the DP noise is seeded from `seed` (reproducible simulation): "
                         "whoever knows the seed can remove it; deployments use "
                         "privacy.noise-source = \"secure\"")
        if cfg.user_level:
            lines.append("user level trusts the server: it sees every sampled client's update "
                         "before clipping and noise")
        if cfg.private and math.isinf(cfg.preprocess.epsilon) and cfg.data.tabular:
            lines.append("preprocessing statistics are exact (preprocess.epsilon = inf): "
                         "each row's influence on the encoding of others is outside every ε")
        if cfg.data.dataset not in SHIPPED_DATASETS:  # csv, parquet, image-folder, a loader
            keys = ("classes", "categories") if cfg.data.tabular else ("classes",)
            if cfg.regression:  # a regression label has no classes to infer
                keys = tuple(k for k in keys if k != "classes")
            undeclared = [k for k in keys if not shaped(getattr(cfg.data, k), None)]
            if undeclared:
                lines.append(f"data.{' and data.'.join(undeclared)} were inferred from every "
                             "client's rows (possible in simulation only): the vocabulary is "
                             "outside every ε; declare them to make them public")
        if cfg.data.loader and not cfg.data.tabular:
            lines.append(f"data.dataset = {cfg.data.dataset!r} returned arrays, trained on as "
                         "they are: whatever the loader computed from rows (scaling, "
                         "normalisation) is outside every ε")
        sent = sorted(set().union(*self.released.values())) if self.released else []
        if sent:
            lines.append("sent by clients in the clear, outside every ε: " + ", ".join(sent)
                         + " (per client: privacy.released_in_clear)")
        return lines

    @_locked
    def write_summary(self, status: str, completed: int | None = None,
                      accuracy: float | None = None, loss: float | None = None) -> None:
        last = self.round_rows[-1] if self.round_rows else {}
        if completed is None:
            completed = int(last.get("round", 0))
            accuracy = float(last["test_accuracy"]) if last.get("test_accuracy") else None
            loss = float(last["test_loss"]) if last else None
        privacy = self.cfg.privacy
        regression = self.cfg.regression
        # regression: no accuracy key (left out, as in rounds.csv); the scores in the
        # label's units, and the scale that maps model.pt's outputs back to them
        headline = {"loss": loss} if regression else {"accuracy": accuracy, "loss": loss}
        score_keys = (("test_rmse", "test_mae", "test_r2", "baseline_rmse", "baseline_mae")
                      if regression else ("test_balanced_accuracy", "test_macro_f1",
                                          "test_auc", "majority_baseline"))
        summary = {
            "name": self.cfg.name, "run_id": self.run, "status": status,
            "task": self.cfg.train.task, **headline,
            "scores": {k: float(last[k]) if last.get(k) else None for k in score_keys},
            **({"target": self._target()} if regression else {}),
            "rounds": completed, "planned_rounds": self.cfg.rounds,
            "stop_reason": self.stop_reason,
            "wall_seconds": round(time.time() - self.started, 3), "seed": self.cfg.seed,
            "num_clients": self.cfg.num_clients,
            "clients_per_round": self.cfg.clients_per_round,
            "privacy": {
                "level": privacy.level if (self.cfg.private or self.cfg.user_level)
                else "none",
                "target_epsilon": privacy.epsilon if self.cfg.private else None,
                "delta": privacy.delta, "accountant": privacy.accountant,
                "max_grad_norm": privacy.max_grad_norm,
                # how DP-SGD computed the clipped gradients: train.dp-path, and what the
                # clients that trained used (auto: one-pass, or the Opacus mode they measured)
                "dp_path": {"requested": self.cfg.train.dp_path,
                            "used": sorted({c["dp_path"] for c in self.clients.values()
                                            if c.get("dp_path")})},
                "max_epsilon": self.max_epsilon(),
                "user_level": self._user_level_summary(),
                "noise_source": self.noise_source,
                "clients": {cid: self._client_summary(cid, c, status != "running")
                            for cid, c in self._sorted_clients()},
                "released_in_clear": {cid: sorted(keys) for cid, keys in
                                      sorted(self.released.items(), key=lambda kv:
                                             int(kv[0]) if kv[0].isdigit() else 1 << 30)},
                "not_covered": self.not_covered(),
            },
            "failures": {"count": len(self.failures), "clients": dict(sorted(
                self.failures.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else 1 << 30))},
            "data": {cid: c.get("data", {}) for cid, c in self._sorted_clients()},
            "data_warnings": self.data_warnings,
            "classes": self.classes,
            "evaluation": self.cfg.evaluation.mode,
            # train.device, and where it took the server's evaluation and the clients that
            # trained (per client: privacy.clients.<id>.device)
            "device": {"requested": self.cfg.train.device, "server": self.server_device,
                       "clients": sorted({c["device"] for c in self.clients.values()
                                          if c.get("device")})},
            "preprocess": {"fit": self.cfg.fit_mode,
                           "epsilon": self.cfg.preprocess.epsilon if self.cfg.private
                           and self.cfg.data.tabular else None,
                           "features": self.transform_features,
                           "estimated_bounds": {c: list(b) for c, b in
                                                self.estimated_bounds.items()},
                           "estimated_bounds_per_client": self.client_ranges},
            "versions": versions(),
            # libraries whose internals privet patched in this process (privet.patches)
            "patched": list(patches.installed()),
            "tracking": self.tracking.summary(),  # where it was logged, and whether all went
        }
        with _ENDED_LOCK:  # a run the CLI has marked ended stays ended, whatever the
            ended = _ENDED.get(self._key)  # ServerApp's thread says after
            if ended:
                summary["status"] = ended
            # while running (see end_round): on one line, by json's C encoder; indented once
            # the run has ended
            running = summary["status"] == "running"
            results.write_json(self.run_dir / results.SUMMARY, summary, compact=running,
                               durable=not running)

    def _target(self) -> dict:
        """Regression: the label, its public range and the map of model outputs z to its
        units (y = center + half·z), the loss, and where the baseline constant comes from."""
        scale = target_scale(self.cfg)
        return {"label": self.cfg.data.label, **scale.as_dict(), "loss": self.cfg.loss_name,
                "scaled": "z = (clip(y, low, high) - center) / half on the clients; the "
                          "model predicts z",
                "baseline": "the mean of the server's test labels (its own rows)"}

    def _sorted_clients(self) -> list[tuple[str, dict]]:
        return sorted(self.clients.items(),
                      key=lambda kv: int(kv[0]) if kv[0].isdigit() else 1 << 30)

    def finish(self, status: str) -> None:
        results.sync(*(self.run_dir / name for name in (results.METRICS, results.ROUNDS,
                                                         results.MODEL)))
        self.write_summary(status)
        plots.draw(self.run_dir)
        if self.tracking.end(status):  # logs the files just written; then what it did
            self.write_summary(status)
        for line in self.not_covered():  # a deployment's operator reads the streamed log
            log.info("privet: not covered by ε: %s", line)


# The recorders of the runs this process hosts, by run directory (mark_ended writes theirs)
_LIVE: dict[Path, "weakref.ReferenceType[RunRecorder]"] = {}

# Run directories whose end the process hosting the ServerApp has seen first (Ctrl-C,
# SIGTERM, a failure): the ServerApp's thread may still finish a round after that, and must
# not write "running" over it.
_ENDED: dict[Path, str] = {}
_ENDED_LOCK = threading.Lock()


def stopping(resolved_run_dir: Path, status: str = "interrupted") -> None:
    """From a signal handler: the run in `resolved_run_dir` (already resolved) is ending;
    its recorder writes no more rounds (end_round) from now on. mark_ended follows."""
    _ENDED.setdefault(resolved_run_dir, status)  # one dict operation: no lock


def mark_ended(run_dir: Path, status: str) -> None:
    """Record that the run in `run_dir` ended with `status` (e.g. "interrupted"): its
    summary says so now, and any later write of this process keeps it. Raises OSError when
    the summary cannot be rewritten (a full disk: the rounds written stay)."""
    run_dir = Path(run_dir).resolve()
    path = run_dir / results.SUMMARY
    with _ENDED_LOCK:
        _ENDED[run_dir] = status  # (over what `stopping` set)
    recorder = _LIVE.get(run_dir, lambda: None)()
    if recorder is not None:  # this process records the run: the summary of its last round
        try:
            recorder.write_summary(status)
            return
        except OSError:
            raise
        except Exception:  # noqa: BLE001 - state mid-change: at least the status, below
            pass
    with _ENDED_LOCK:
        if path.exists():
            summary = json.loads(path.read_text(encoding="utf-8"))
            if summary.get("status") == "running":
                summary["status"] = status
                results.write_json(path, summary)


def _fmt(value) -> str:
    if value is None:
        return ""
    value = float(value)
    return "" if math.isnan(value) else "inf" if math.isinf(value) else f"{value:.6g}"


def _torch_bytes(obj) -> bytes:
    import io
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
