"""Flower ClientApp: unpack the message, train or evaluate locally, reply.

Only weights and a few metrics leave the client: never rows. The privacy ledger
lives in `context.state`, which Flower keeps for the node across rounds.
"""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.train import sample_rate, steps_per_epoch, train_local
from common import records as R
from common.config import IMAGE_DATASETS, ExperimentConfig, from_run_config
from common.data import federated
from common.data.datasets import (
    ClientData,
    classes,
    cleaned_client,
    client_data,
    client_holdout,
    num_classes,
    schema,
)
from common.data.preprocess import FittedTransform
from common.evaluation import evaluate as evaluate_model
from common.models import GRAD_SAMPLE_MODE, build_model
from common.privacy.accountants import calibrate_noise
from common.privacy.ledger import LedgerFile, PrivacyLedger

LEDGER_KEY = "privacy-ledger"
STAGES = ("statistics", "pca")
log = logging.getLogger("flwr")

# One torch thread per actor: Ray gives each ClientApp one CPU (actors × threads ≤ cores).
torch.set_num_threads(max(1, int(os.environ.get("PRIVET_TORCH_THREADS", "1"))))

app = ClientApp()


def _client_id(context: Context) -> int:
    """The participant's number: Flower's simulation sets it; a deployed node names it in
    `--node-config "partition-id=<0..num-clients-1> data-path=<its file>"`."""
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"node config {dict(context.node_config)}: expected partition-id=<client number> "
            "(and data-path=<file> when the node reads its own data)") from None


def _data_path(context: Context) -> str:
    """A deployed node's own data file (`--node-config "data-path=..."`); "" in simulation."""
    return str(context.node_config.get("data-path", ""))


def _ledger_file(cfg: ExperimentConfig, context: Context, client_id: int) -> LedgerFile | None:
    """On disk when the node says where (`ledger-dir`, or next to its `data-path`) or the
    experiment sets `privacy.ledger-dir`; otherwise the ledger lives in context.state only."""
    node = context.node_config
    if "ledger-dir" in node:
        directory = str(node["ledger-dir"])
    elif "data-path" in node:
        directory = os.path.dirname(os.path.abspath(str(node["data-path"])))
    else:
        directory = cfg.privacy.ledger_dir
    return LedgerFile(directory, cfg.experiment_id(), f"client{client_id}") if directory else None


def _load_ledger(context: Context, file: LedgerFile | None) -> PrivacyLedger:
    if LEDGER_KEY in context.state:
        return PrivacyLedger.from_json(str(context.state[LEDGER_KEY]["json"]))
    return file.load() if file else PrivacyLedger()  # a restarted node resumes from disk


def _save_ledger(context: Context, file: LedgerFile | None, ledger: PrivacyLedger) -> None:
    if file:
        file.save(ledger)  # disk first: a crash right after still remembers the spend
    context.state[LEDGER_KEY] = ConfigRecord({"json": ledger.to_json()})


def planned_noise(cfg: ExperimentConfig, num_rows: int, target_epsilon: float
                  ) -> tuple[float, float, int]:
    """(σ, q, steps per round) calibrated once for the whole run's horizon.

    The horizon assumes the client trains in every round, the worst case under
    client sampling, so its ε can never pass the target.
    """
    q = sample_rate(num_rows, cfg.train.batch_size)
    steps = cfg.train.local_epochs * steps_per_epoch(num_rows, cfg.train.batch_size)
    sigma = calibrate_noise(target_epsilon, cfg.privacy.delta, q, steps * cfg.rounds,
                            cfg.privacy.accountant, prior=preprocess_spending(cfg))
    return sigma, q, steps


def preprocess_spending(cfg: ExperimentConfig) -> tuple[tuple[float, float, int], ...]:
    """The ledger entries federated preprocessing adds before training: one Gaussian
    mechanism per statistics round, (σ, q = 1, rounds)."""
    sigma, rounds = federated.statistics_noise(cfg)
    return ((sigma, 1.0, rounds),) if sigma else ()


def _ledger_metrics(ledger: PrivacyLedger) -> dict:
    return {R.LEDGER_SIGMA: [float(s) for s, _, _ in ledger.history],
            R.LEDGER_RATE: [float(q) for _, q, _ in ledger.history],
            R.LEDGER_STEPS: [int(n) for _, _, n in ledger.history]}


def _model(cfg: ExperimentConfig, data: ClientData, arrays: ArrayRecord, data_path: str
           ) -> torch.nn.Module:
    model = build_model(cfg.train, data.features.shape[1:], num_classes(cfg, data_path))
    R.load_arrays(model, arrays)
    return model


def _transform(msg: Message) -> str:
    """The shared transform the server fitted federatedly ("" = fit on own rows)."""
    config = msg.content.config_records.get("config")
    return str(config.get(R.TRANSFORM, "")) if config else ""


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """What the server needs to build the model without holding any data: the example
    shape and the classes; and, for the partition report, rows per class and missing cells.
    Counts only, no rows."""
    cfg = from_run_config(context.run_config)
    client_id = _client_id(context)
    train_share = client_data(cfg, client_id, _transform(msg), _data_path(context))
    if cfg.data.dataset in IMAGE_DATASETS:
        labels, report = train_share.labels, train_share.cleaning
    else:
        _, labels, report = cleaned_client(cfg, client_id, _data_path(context))
    names = classes(cfg, _data_path(context))
    if cfg.evaluation.mode == "federated":
        labels = np.concatenate([labels, client_holdout(
            cfg, client_id, _transform(msg), _data_path(context)).labels])
    reply = ConfigRecord({
        R.CLIENT_ID: client_id, "rows": report.rows_in, "missing-cells": report.missing_cells,
        "classes": list(names), "label-counts": np.bincount(labels, minlength=len(names))
        .astype(int).tolist(), "input-shape": list(train_share.features.shape[1:])})
    return Message(RecordDict({"describe": reply}), reply_to=msg)


@app.query()
def statistics(msg: Message, context: Context) -> Message:
    """Federated preprocessing: noised aggregate statistics of this client's rows.

    The noise is computed here from the client's own config, never taken from the
    server, and its cost goes into the ledger before the reply leaves.
    """
    cfg = from_run_config(context.run_config)
    client_id = _client_id(context)
    stage = str(msg.content["config"][R.STAGE])
    frame, labels, _ = cleaned_client(cfg, client_id, _data_path(context))
    table = schema(cfg, _data_path(context))
    if stage not in STAGES:
        raise ValueError(f"unknown statistics stage {stage!r}")
    if stage == "statistics":
        stats = federated.client_statistics(frame, labels, table, cfg.preprocess.bins)
        sensitivity = federated.stats_sensitivity(table)
    elif stage == "pca":
        transform = FittedTransform.from_json(str(msg.content["config"][R.TRANSFORM]))
        features = transform.apply(frame)
        stats = federated.pca_statistics(features, federated.pca_clip_norm(features.shape[1]))
        sensitivity = federated.PCA_SENSITIVITY
    sigma, _ = federated.statistics_noise(cfg)
    if sigma:
        ledger_file = _ledger_file(cfg, context, client_id)
        ledger = _load_ledger(context, ledger_file)
        ledger.record(sigma, 1.0, 1)
        _save_ledger(context, ledger_file, ledger)
    rng = np.random.default_rng([cfg.seed, client_id, STAGES.index(stage), 0x5EED])
    noisy = federated.add_noise(stats, sigma * sensitivity, rng)
    arrays = ArrayRecord({name: Array(np.asarray(v, dtype=np.float64))
                          for name, v in noisy.items()})
    return Message(RecordDict({"statistics": arrays,
                               "metrics": MetricRecord({R.CLIENT_ID: client_id})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = from_run_config(context.run_config)
    client_id = _client_id(context)
    data = client_data(cfg, client_id, _transform(msg), _data_path(context))
    server_round = int(msg.content["config"]["server-round"])
    model = _model(cfg, data, msg.content["arrays"], _data_path(context))
    ledger_file = _ledger_file(cfg, context, client_id)
    ledger = _load_ledger(context, ledger_file)
    seed = cfg.seed * 1_000_003 + server_round * 1009 + client_id
    base = {R.CLIENT_ID: client_id,
            **{R.DATA_PREFIX + k: v for k, v in data.cleaning.as_dict().items()}}

    if len(data) < cfg.train.batch_size:
        log.warning("client %d: %d row(s) after cleaning, fewer than train.batch-size = %d; "
                    "it is left out of training", client_id, len(data), cfg.train.batch_size)
        metrics = {**base, R.DECLINED: 1, R.TOO_SMALL: 1, R.NUM_EXAMPLES: 0,
                   R.EPSILON: ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant),
                   **_ledger_metrics(ledger)}
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)

    sigma = q = None
    private, target = cfg.client_private(client_id), cfg.epsilon_for(client_id)
    base[R.TARGET_EPSILON] = target
    accounting_start = time.perf_counter()
    if private:
        sigma, q, steps = planned_noise(cfg, len(data), target)
        if cfg.privacy.delta >= 1 / len(data):
            log.warning("client %d: δ = %g ≥ 1/n = 1/%d; the guarantee is weak",
                        client_id, cfg.privacy.delta, len(data))
        next_epsilon = ledger.epsilon_after(sigma, q, steps, cfg.privacy.delta,
                                            cfg.privacy.accountant)
        if next_epsilon > target:
            log.warning("client %d declines round %d: ε would reach %.4f > target %.4f",
                        client_id, server_round, next_epsilon, target)
            metrics = {**base, R.DECLINED: 1, R.NUM_EXAMPLES: 0,
                       R.EPSILON: ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant),
                       **_ledger_metrics(ledger)}
            return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    accounting_seconds = time.perf_counter() - accounting_start

    result = train_local(model, data.features, data.labels, epochs=cfg.train.local_epochs,
                         batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                         momentum=cfg.train.momentum, seed=seed, noise_multiplier=sigma,
                         max_grad_norm=cfg.privacy.max_grad_norm,
                         grad_sample_mode=GRAD_SAMPLE_MODE[cfg.train.model])
    epsilon = 0.0
    if sigma is not None:
        ledger.record(sigma, q, result.steps)
        _save_ledger(context, ledger_file, ledger)
        accounting_start = time.perf_counter()
        epsilon = ledger.epsilon(cfg.privacy.delta, cfg.privacy.accountant)
        accounting_seconds += time.perf_counter() - accounting_start
    metrics = {**base, R.DECLINED: 0, R.NUM_EXAMPLES: result.examples,
               R.TRAIN_LOSS: result.loss, R.TRAIN_ACCURACY: result.accuracy,
               R.EPSILON: epsilon if private else float("inf"), R.STEPS: result.steps,
               R.NOISE_MULTIPLIER: sigma or 0.0, R.SAMPLE_RATE: q or 0.0,
               R.TRAIN_SECONDS: result.seconds, R.ACCOUNTING_SECONDS: accounting_seconds,
               **_ledger_metrics(ledger)}
    content = RecordDict({"arrays": R.to_arrays(model), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model here: on the held-out share of this client's rows with
    `evaluation.mode = "federated"`, else on all of them."""
    cfg = from_run_config(context.run_config)
    args = (cfg, _client_id(context), _transform(msg), _data_path(context))
    data = client_holdout(*args) if cfg.evaluation.mode == "federated" else client_data(*args)
    model = _model(cfg, data, msg.content["arrays"], _data_path(context))
    loss, accuracy = evaluate_model(model, data.features, data.labels)
    metrics = MetricRecord({R.CLIENT_ID: _client_id(context), R.NUM_EXAMPLES: len(data),
                            R.EVAL_LOSS: loss, R.EVAL_ACCURACY: accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
