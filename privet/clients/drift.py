"""Drift mode on the client: monitor a new window with the global model, train on it.

Two ClientApp handlers, registered by clients/app.py: `monitor` (message type
"query.drift_monitor") and `train` ("train.drift"). A window's rows are read from the
source only here; what leaves is the noised monitoring vector (common.drift.signals), the
DP-SGD weights, and what was spent (σ, sampling rate, steps; with the window's examples,
which a file's rows make data-dependent: listed as not covered). Each window has its own
ledger (common.drift.accounting): monitoring and training are recorded in it before the
reply that carries their result leaves.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from privet.clients import accounting as A
from privet.clients.train import train_local
from privet.common import records as R
from privet.common.config import ExperimentConfig
from privet.common.device import resolve_device
from privet.common.drift import accounting as drift_accounting
from privet.common.drift import signals, streams
from privet.common.models import build_model
from privet.common.privacy.ledger import ALL_ROWS, DataLedger, RunFileStore, SpendRecord
from privet.common.privacy.randomness import make_randomness

WINDOW = "window"
MONITOR_STREAM = 0xD71F  # seeds the monitoring noise apart from DP-SGD's
STATE_KEY = "privacy-ledger-window-{}"


def ledgers_root(run_dir: str) -> str:
    """The folder of a simulation's window ledgers (client-<c>/window-<w>.json)."""
    return os.path.join(run_dir, A.RUN_LEDGERS, "drift")


def ledger_path(run_dir: str, client: int, window: int) -> str:
    """Where a simulation keeps client `client`'s ledger of window `window`."""
    return os.path.join(ledgers_root(run_dir), f"client-{client}", f"window-{window}.json")


def open_window_ledger(cfg: ExperimentConfig, context: Context, client: int, window: int,
                       run: str) -> DataLedger:
    """The ledger of client `client`'s rows of window `window` (rows of other windows are
    other rows: each window has its own store, so nothing of theirs composes in)."""
    if cfg.out_dir and os.path.isdir(cfg.out_dir):
        store = RunFileStore(ledger_path(cfg.out_dir, client, window))
    else:
        # where the run directory is out of reach: one key of context.state per window
        store = A.StateStore(context.state, STATE_KEY.format(window))
    current = SpendRecord(f"{run or 'run'}-client{client}-window{window}", run, str(client),
                          f"drift:{cfg.drift.source}:window{window}", ALL_ROWS,
                          A.noise_source(cfg, context))
    return DataLedger(store, current, None)


def _model(cfg: ExperimentConfig, arrays: ArrayRecord):
    model = build_model(cfg.train, (len(streams.feature_names(cfg)),),
                        streams.num_classes(cfg))
    R.load_arrays(model, arrays)
    return model


def _fingerprint(msg: Message) -> str:
    digest = hashlib.blake2b(digest_size=16)
    R.update_digest(digest, msg.content["arrays"])
    return digest.hexdigest()


def _window_ledger(cfg, msg, context):
    client = A.client_id(context)
    config = msg.content["config"]
    window = int(config[WINDOW])
    run = str(config.get(R.RUN, ""))
    return client, window, open_window_ledger(cfg, context, client, window, run)


def monitor(cfg: ExperimentConfig, msg: Message, context: Context) -> Message:
    """Evaluate the global model on this client's new window and release the noised
    monitoring vector (common.drift.signals); paid from the window's ledger first."""
    client, window, ledger = _window_ledger(cfg, msg, context)
    rows = streams.window(cfg, client, window)
    model = _model(cfg, msg.content["arrays"])
    stats = signals.client_statistics(model, rows.features, rows.labels,
                                      cfg.drift.monitor_bins, streams.model_input)
    metrics = {R.CLIENT_ID: client, WINDOW: window, R.DECLINED: 0}
    sigma = 0.0
    if cfg.client_private(client):
        spend = drift_accounting.monitor_spend(cfg)
        release = (f"monitor-{window}", _fingerprint(msg))
        spent = ledger.reserve([spend], cfg.epsilon_for(client), cfg.privacy.delta,
                               cfg.privacy.accountant, release)
        if spent is None:  # never: a window is monitored once (config.check bounds it)
            return Message(RecordDict({"metrics": MetricRecord({**metrics, R.DECLINED: 1})}),
                           reply_to=msg)
        sigma = spend.sigma * signals.sensitivity(rows.features.shape[1])
        metrics[R.EPSILON] = spent
    randomness = make_randomness(ledger.current.noise_source,
                                 [cfg.seed, client, window, MONITOR_STREAM,
                                  ledger.attempt(f"monitor-{window}", _fingerprint(msg))])
    noisy = stats + (randomness.gaussian_numpy(stats.shape, sigma) if sigma else 0.0)
    return Message(RecordDict({"monitor": ArrayRecord({"vector": Array(
        np.asarray(noisy, dtype=np.float64))}), "metrics": MetricRecord(metrics),
        R.PRIVACY: _spends(ledger)}), reply_to=msg)


def train(cfg: ExperimentConfig, msg: Message, context: Context) -> Message:
    """DP-SGD on this client's rows of the round's window, σ calibrated for the window's
    horizon after its monitoring (common.drift.accounting); paid before the steps run."""
    client, window, ledger = _window_ledger(cfg, msg, context)
    server_round = int(msg.content["config"]["server-round"])
    rows = streams.window(cfg, client, window)
    base = {R.CLIENT_ID: client, WINDOW: window}
    if len(rows) < cfg.train.batch_size:
        return Message(RecordDict({"metrics": MetricRecord(
            {**base, R.DECLINED: 1, R.TOO_SMALL: 1, R.NUM_EXAMPLES: 0})}), reply_to=msg)
    model = _model(cfg, msg.content["arrays"])
    seed = (cfg.seed * 1_000_003 + server_round * 1009 + client) % (1 << 63)
    sigma = q = None
    epsilon = float("inf")
    if cfg.client_private(client):
        sigma, q, steps = drift_accounting.plan(cfg, len(rows), cfg.epsilon_for(client))
        release = (f"train-{server_round}", _fingerprint(msg))
        spent = ledger.reserve([drift_accounting.Spend(sigma, q, steps, "dp-sgd")],
                               cfg.epsilon_for(client), cfg.privacy.delta,
                               cfg.privacy.accountant, release)
        if spent is None:
            return Message(RecordDict({"metrics": MetricRecord(
                {**base, R.DECLINED: 1, R.NUM_EXAMPLES: 0})}), reply_to=msg)
        epsilon = spent
        seed = A.redo_seed(seed, ledger.attempt(*release))
    result = train_local(model, streams.model_input(rows.features), rows.labels,
                         epochs=cfg.train.local_epochs,
                         batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                         momentum=cfg.train.momentum, seed=seed, noise_multiplier=sigma,
                         max_grad_norm=cfg.privacy.max_grad_norm,
                         grad_sample_mode=cfg.train.dp_path,
                         randomness=make_randomness(ledger.current.noise_source, seed),
                         loss=cfg.loss_name, device=resolve_device(cfg.train.device))
    metrics = {**base, R.DECLINED: 0, R.NUM_EXAMPLES: result.examples, R.EPSILON: epsilon,
               R.STEPS: result.steps, R.NOISE_MULTIPLIER: sigma or 0.0,
               R.SAMPLE_RATE: q or 0.0, R.TRAIN_SECONDS: result.seconds}
    return Message(RecordDict({"metrics": MetricRecord(metrics), R.PRIVACY: _spends(ledger),
                               "arrays": R.to_arrays(model)}), reply_to=msg)


def _spends(ledger: DataLedger) -> ConfigRecord:
    """The window's spends so far ([σ, rate, steps, purpose] each), for the server's report
    of what one person with a row in every window has spent (their composition)."""
    return ConfigRecord({R.LEDGER: json.dumps([s.to_list() for s in ledger.current.spends])})
