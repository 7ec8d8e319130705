"""Flower ClientApp: unpack the message, train or evaluate locally, reply.

Only weights, a few metrics and what the client spent leave it: never rows. Its privacy
ledger (clients/accounting.py) is on disk next to a deployed node's data, or in
`context.state`, which Flower keeps for a simulated node across rounds; every spend is
recorded before the reply that carries its result leaves.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import update_console_handler

from privet import patches
from privet.clients import accounting as A
from privet.clients import drift
from privet.clients import metrics as metrics_dp
from privet.clients.preprocessing import own_transform, planned
from privet.clients.train import train_local
from privet.common import records as R
from privet.common.config import ExperimentConfig, from_run_config
from privet.common.data import federated
from privet.common.data.datasets import (
    ClientData,
    classes,
    cleaned_client,
    client_data,
    client_holdout,
    encoded_width,
    feature_description,
    num_outputs,
    schema,
)
from privet.common.data.preprocess import FittedTransform
from privet.common.device import device_code, resolve_device
from privet.common.evaluation import evaluate as evaluate_model
from privet.common.models import build_model
from privet.common.privacy.ledger import BudgetDeclined, DataLedger, Spend
from privet.common.privacy.randomness import make_randomness

STAGES = ("statistics", "pca", "bounds")  # the index seeds each stage's seeded noise
log = logging.getLogger("flwr")
# Flower colours its log lines; not where they go to a file or a pipe
update_console_handler(colored=sys.stderr.isatty())

# One torch thread per actor: Ray gives each ClientApp one CPU (actors × threads ≤ cores).
torch.set_num_threads(max(1, int(os.environ.get("PRIVET_TORCH_THREADS", "1"))))

app = ClientApp()
_WARNED: set[tuple[int, float]] = set()


def _failures_named(**defaults):
    """Make a ClientApp function reply, when its work raises, with what went wrong under the
    client's id (metrics `failed`, ConfigRecord `failure`: the reason) instead of Flower's
    anonymous error: the server names the client, leaves it out of later rounds and says the
    run finished with failures. `defaults`: metric values the reply needs (weights 0)."""
    def decorate(handler):
        @functools.wraps(handler)
        def wrapped(msg: Message, context: Context) -> Message:
            try:
                patches.install("dp-accounting")  # nothing on stock libraries
                return handler(msg, context)
            except Exception as error:  # noqa: BLE001 - reported, under the client's id
                client_id = A.client_id(context)  # without an id: Flower's own error
                reason = f"{type(error).__name__}: {error}"
                if A.deployed(context):  # a node's own console; a simulation's summary says it
                    log.error("privet: client %d failed: %s", client_id, reason)
                metrics = MetricRecord({R.CLIENT_ID: client_id, R.FAILED: 1, R.DECLINED: 1,
                                        R.NUM_EXAMPLES: 0, **defaults})
                failure = ConfigRecord({"reason": reason[:2000]})
                content = {"metrics": metrics, R.FAILURE: failure}
                try:  # what it spent before failing (a round is paid before it runs)
                    cfg = _config(context)
                    content[R.PRIVACY] = _privacy_record(
                        cfg, A.open_ledger(cfg, context, client_id, _run(msg)))
                except Exception:  # noqa: BLE001 - the failure may be the ledger's own
                    pass
                return Message(RecordDict(content), reply_to=msg)
        return wrapped
    return decorate


@functools.lru_cache(maxsize=8)
def _parsed(items: tuple) -> ExperimentConfig:
    """from_run_config, once per distinct run config (every message carries the run's; the
    parse costs ~0.2 ms). ExperimentConfig is frozen: sharing it is safe."""
    return from_run_config(dict(items))


def _config(context: Context) -> ExperimentConfig:
    """The experiment's config; on a deployed node whose data comes from a user's loader
    (`data.dataset = "package.module:loader"`), with `data.path` = the node's `data-path`, so
    that everything the node asks of its data (whether it is a table included) is asked of
    what the loader returns for its own rows."""
    cfg = _parsed(tuple(sorted(context.run_config.items())))
    path = A.data_path(context)
    if path and cfg.data.loader:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, path=path))
    return cfg


def _run(msg: Message) -> str:
    """The run's id, sent by the server with every message: spend under it is this run's.
    Raises ValueError unless it is 1-64 letters, digits, `_` or `-` (it names files)."""
    config = msg.content.config_records.get("config")
    run = str(config.get(R.RUN, "")) if config else ""
    if run and not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run):
        raise ValueError(f"run id {run[:80]!r} from the server: expected 1-64 letters, digits, "
                         "'_' or '-'")
    return run


def _privacy_record(cfg: ExperimentConfig, ledger: DataLedger, transform: str = ""
                    ) -> ConfigRecord:
    """What the client spent, for the server's report; with the transform it fitted with DP
    itself (a DP release: sending it costs nothing more)."""
    report = ledger.report(cfg.privacy.delta, cfg.privacy.accountant)
    if ledger.current.transform and transform == ledger.current.transform:
        report["transform"] = transform
    return ConfigRecord({R.LEDGER: json.dumps(report)})


def _model(cfg: ExperimentConfig, data: ClientData, arrays: ArrayRecord, data_path: str
           ) -> torch.nn.Module:
    model = build_model(cfg.train, data.features.shape[1:], num_outputs(cfg, data_path),
                        data.feature_spec)
    R.load_arrays(model, arrays)
    return model


def _same_buffers(cfg: ExperimentConfig, model: torch.nn.Module,
                  before: dict[str, torch.Tensor]) -> None:
    """Raises ValueError (before any reply leaves) when training changed a buffer of the
    model's state dict: a buffer is not a parameter, so DP-SGD neither clips nor noises it,
    and the reply carries the whole state dict: what the data wrote into it (a running mean,
    a count) would reach the server outside every ε."""
    after = model.state_dict()
    changed = [name for name, value in before.items()
               if name in after and not torch.equal(after[name], value)]
    if changed:
        raise ValueError(f"train.model = {cfg.train.model!r}: training changed buffer(s) "
                         f"{', '.join(changed)}, which would leave this client outside every "
                         "ε (DP-SGD noises parameters only); not sent. Make them parameters, "
                         "non-persistent buffers (register_buffer(..., persistent=False)) or "
                         "constants")


def _transform(msg: Message) -> str:
    """The shared transform the server fitted federatedly ("" = fit on own rows)."""
    config = msg.content.config_records.get("config")
    return str(config.get(R.TRANSFORM, "")) if config else ""


@app.query("describe")
def describe(msg: Message, context: Context) -> Message:
    """What the server needs to build the model without holding any data: the example
    shape and the classes; and, for the partition report, rows per class and missing cells.
    Counts only, no rows (and no transform: the shape, and what each column is, follow from
    the schema)."""
    cfg = _config(context)
    client_id, data_path = A.client_id(context), A.data_path(context)
    if not cfg.data.tabular:
        train_share = client_data(cfg, client_id, "", data_path)
        labels, report = train_share.labels, train_share.cleaning
        shape = list(train_share.features.shape[1:])
        if cfg.evaluation.mode == "federated":
            labels = np.concatenate([labels, client_holdout(cfg, client_id, "", data_path).labels])
    else:
        cleaned, labels, report = _cleaned_all_rows(cfg, client_id, data_path)
        shape = [encoded_width(schema(cfg, data_path))]
    names = classes(cfg, data_path)
    layout = feature_description(cfg, data_path)
    reply = ConfigRecord({
        R.CLIENT_ID: client_id, "rows": report.rows_in, "missing-cells": report.missing_cells,
        "classes": list(names), "label-counts": np.bincount(labels, minlength=len(names))
        .astype(int).tolist(), "input-shape": shape,
        "features": layout.to_json() if layout else ""})
    return Message(RecordDict({"describe": reply}), reply_to=msg)


def _cleaned_all_rows(cfg: ExperimentConfig, client_id: int, data_path: str):
    """Training and (federated evaluation) held-out rows together, cleaned."""
    frame, labels, report = cleaned_client(cfg, client_id, data_path)
    if cfg.evaluation.mode == "federated":
        _, held, _ = cleaned_client(cfg, client_id, data_path, held_out=True)
        labels = np.concatenate([labels, held])
    return frame, labels, report


@app.query()
@_failures_named()
def statistics(msg: Message, context: Context) -> Message:
    """Federated preprocessing: noised aggregate statistics of this client's rows.

    The noise is computed here from the client's own config, never taken from the
    server, and its cost goes into the ledger before the reply leaves.
    """
    cfg = _config(context)
    client_id, data_path = A.client_id(context), A.data_path(context)
    stage = str(msg.content["config"][R.STAGE])
    if stage not in STAGES:
        raise ValueError(f"unknown statistics stage {stage!r}")
    ledger = A.open_ledger(cfg, context, client_id, _run(msg))
    frame, labels, _ = cleaned_client(cfg, client_id, data_path)
    table = schema(cfg, data_path)
    config = msg.content["config"]
    if stage == "bounds":
        stats = federated.bounds_statistics(frame, federated.missing_bounds(table))
        sensitivity = federated.bounds_sensitivity(federated.missing_bounds(table))
    elif stage == "statistics":
        estimated = {c: tuple(b) for c, b in json.loads(str(config.get(R.BOUNDS, "{}"))).items()}
        estimated = federated.with_bounds(table, estimated)
        if federated.missing_bounds(estimated):
            raise ValueError(f"no range for numeric column(s) "
                             f"{list(federated.missing_bounds(estimated))}: declare data.bounds")
        stats = federated.client_statistics(frame, labels, estimated, cfg.preprocess.bins)
        sensitivity = federated.stats_sensitivity(estimated)
    else:
        transform = FittedTransform.from_json(str(config[R.TRANSFORM]))
        features = transform.apply(frame)
        stats = federated.pca_statistics(features, federated.pca_clip_norm(features.shape[1]))
        sensitivity = federated.PCA_SENSITIVITY
    sigma, _ = federated.statistics_noise(cfg, table)
    if any(s.purpose == stage for s in ledger.current.spends):
        raise ValueError(f"the server asked for the {stage} statistics a second time in run "
                         f"{ledger.current.run!r}: refused (each release is paid for; a run "
                         "asks once)")
    private = sigma and cfg.client_private(client_id)
    if A.min_noise(context) is not None:
        rows = _training_rows(cfg, client_id, data_path)
        _noise_floor(context, A.plan(cfg, client_id, data_path, ledger, rows)
                     if cfg.client_private(client_id) else None,
                     cfg.client_private(client_id), rows)
    if private and (A.plan(cfg, client_id, data_path, ledger,
                           _training_rows(cfg, client_id, data_path)) is None
                    or ledger.reserve([Spend(sigma, 1.0, 1, stage)], cfg.epsilon_for(client_id),
                                      cfg.privacy.delta, cfg.privacy.accountant) is None):
        log.warning("client %d declines to send preprocessing statistics: earlier runs on its "
                    "rows spent ε = %.4f of its target %g", client_id,
                    ledger.prior_epsilon(cfg.privacy.delta, cfg.privacy.accountant),
                    cfg.epsilon_for(client_id))
        return _reply({R.CLIENT_ID: client_id, R.DECLINED: 1},
                      _privacy_record(cfg, ledger), msg=msg)
    if sigma and not private:
        ledger.record(Spend(sigma, 1.0, 1, stage))  # no target to check: still on record
    randomness = make_randomness(ledger.current.noise_source,
                                 [cfg.seed, client_id, STAGES.index(stage), 0x5EED])
    noisy = federated.add_noise(stats, sigma * sensitivity, randomness)
    arrays = ArrayRecord({name: Array(np.asarray(v, dtype=np.float64))
                          for name, v in noisy.items()})
    return Message(RecordDict({"statistics": arrays,
                               "metrics": MetricRecord({R.CLIENT_ID: client_id}),
                               R.PRIVACY: _privacy_record(cfg, ledger)}), reply_to=msg)


def _reply(metrics: dict, privacy: ConfigRecord, model: torch.nn.Module | None = None,
           msg: Message | None = None) -> Message:
    content = RecordDict({"metrics": MetricRecord(metrics), R.PRIVACY: privacy})
    if model is not None:
        content["arrays"] = R.to_arrays(model)
    return Message(content, reply_to=msg)


def _training_rows(cfg: ExperimentConfig, client_id: int, data_path: str) -> int:
    """How many rows the client trains on (after cleaning; without its held-out share)."""
    if not cfg.data.tabular:
        return len(client_data(cfg, client_id, "", data_path))
    return len(cleaned_client(cfg, client_id, data_path)[1])


def _noise_floor(context: Context, plan, private: bool, rows: int) -> None:
    """The node's own floor on its DP-SGD σ (`privet deploy supernode --min-noise`, in its
    node-config), checked before a message spends anything; a plan of None (no budget left)
    is the caller's to decline."""
    floor = A.min_noise(context)
    if floor is None or (private and (plan is None or plan[0] >= floor)):
        return
    sigma = plan[0] if private else 0.0
    raise RuntimeError(f"node policy: min-noise: planned σ = {sigma:.4g} for this node's "
                       f"{rows} rows; its floor is σ ≥ {floor:g}")


@app.train()
@_failures_named()
def train(msg: Message, context: Context) -> Message:
    cfg = _config(context)
    client_id, data_path = A.client_id(context), A.data_path(context)
    delta, accountant = cfg.privacy.delta, cfg.privacy.accountant
    ledger = A.open_ledger(cfg, context, client_id, _run(msg))
    server_round = int(msg.content["config"]["server-round"])
    private, target = cfg.client_private(client_id), cfg.epsilon_for(client_id)
    rows = _training_rows(cfg, client_id, data_path)
    base = {R.CLIENT_ID: client_id, R.TARGET_EPSILON: target}

    def declined(transform: str = "", **flags) -> Message:
        metrics = {**base, R.DECLINED: 1, R.NUM_EXAMPLES: 0, **flags,
                   R.EPSILON: ledger.epsilon(delta, accountant)}
        return _reply(metrics, _privacy_record(cfg, ledger, transform), msg=msg)

    if rows < cfg.train.batch_size:
        if A.deployed(context):  # a simulation says it once for all, before the run
            log.warning("client %d: %d row(s) after cleaning, fewer than train.batch-size = %d; "
                        "it is left out of training", client_id, rows, cfg.train.batch_size)
        return declined(**{R.TOO_SMALL: 1})
    accounting_start = time.perf_counter()  # calibration and ε queries, nothing else
    plan = A.plan(cfg, client_id, data_path, ledger, rows) if private else None
    accounting_seconds = time.perf_counter() - accounting_start
    if private and plan is None:
        earlier = ledger.prior_epsilon(delta, accountant)
        log.warning("client %d declines round %d: %s", client_id, server_round,
                    f"earlier runs on its rows spent ε = {earlier:.4f} of target {target:.4f}"
                    if earlier > 0 else f"its preprocessing and noised metrics alone "
                    f"(preprocess.epsilon, privacy.train-metrics-epsilon) would pass target "
                    f"{target:.4f}")
        return declined()
    _noise_floor(context, plan, private, rows)
    try:
        transform = own_transform(cfg, client_id, data_path, _transform(msg), ledger)
    except BudgetDeclined as why:  # another run on the same ledger spent it meanwhile
        log.warning("%s; it declines round %d", why, server_round)
        return declined()
    data = client_data(cfg, client_id, transform, data_path)
    base.update({R.DATA_PREFIX + k: v for k, v in data.cleaning.as_dict().items()})
    model = _model(cfg, data, msg.content["arrays"], data_path)
    seed = (cfg.seed * 1_000_003 + server_round * 1009 + client_id) % (1 << 63)
    # what this round's release depends on besides the rows and the seed: paid once per
    # distinct input (a resumed run replaying it with seeded noise pays nothing more)
    release = (f"train-{server_round}", _fingerprint(msg, transform))

    sigma = q = None
    if private:
        sigma, q, steps = plan
        if delta >= 1 / len(data) and (client_id, delta) not in _WARNED:
            _WARNED.add((client_id, delta))  # once per client in this process, not per round
            log.warning("client %d: δ = %g ≥ 1/n = 1/%d; the guarantee is weak",
                        client_id, delta, len(data))
        accounting_start = time.perf_counter()
        this_round = [Spend(sigma, q, steps, "dp-sgd")] + (
            [metrics_dp.one_round(cfg)] if metrics_dp.noised(cfg, client_id) else [])
        # recorded before the steps run, in one step with the check (other runs may share
        # the ledger): a round that then fails has been paid for, never the other way round
        reserved = ledger.reserve(this_round, target, delta, accountant, release)
        accounting_seconds += time.perf_counter() - accounting_start
        if reserved is None:
            log.warning("client %d declines round %d: ε would pass target %.4f",
                        client_id, server_round, target)
            return declined(transform)
        # a redo on other inputs: never the noise of a release already made
        seed = A.redo_seed(seed, ledger.attempt(*release))

    buffers = {name: b.detach().clone() for name, b in model.state_dict().items()
               if name not in dict(model.named_parameters())}
    device = resolve_device(cfg.train.device)  # DeviceError: cuda asked for, none here
    result = train_local(model, data.features, data.labels, epochs=cfg.train.local_epochs,
                         batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                         momentum=cfg.train.momentum, seed=seed, noise_multiplier=sigma,
                         max_grad_norm=cfg.privacy.max_grad_norm,
                         grad_sample_mode=cfg.train.dp_path,
                         randomness=make_randomness(ledger.current.noise_source, seed),
                         # FedProx (Flower's key): data-independent, added after the noise
                         proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
                         loss=cfg.loss_name, device=device)
    _same_buffers(cfg, model, buffers)
    epsilon = 0.0
    if sigma is not None:
        if result.steps != steps:  # never: the steps are fixed by n and B; paid as planned
            raise RuntimeError(f"took {result.steps} DP-SGD steps, {steps} were recorded")
        epsilon = reserved
    metrics = {**base, R.DECLINED: 0, R.NUM_EXAMPLES: result.examples,
               R.EPSILON: epsilon if private else float("inf"), R.STEPS: result.steps,
               R.NOISE_MULTIPLIER: sigma or 0.0, R.SAMPLE_RATE: q or 0.0,
               R.TRAIN_SECONDS: result.seconds, R.ACCOUNTING_SECONDS: accounting_seconds}
    if result.dp_path:
        metrics[R.DP_PATH] = R.DP_PATHS.index(result.dp_path)
    metrics[R.DEVICE] = device_code(device)
    if metrics_dp.noised(cfg, client_id):  # paid for with the steps, above
        randomness = make_randomness(ledger.current.noise_source,
                                     [cfg.seed, server_round, client_id, metrics_dp.STREAM]
                                     + ([ledger.attempt(*release)]
                                        if ledger.attempt(*release) else []))
        loss, accuracy = metrics_dp.release(model, data.features, data.labels,
                                            this_round[-1].sigma, randomness, cfg.loss_name)
        metrics.update({R.TRAIN_LOSS: loss, **_accuracy(R.TRAIN_ACCURACY, accuracy)})
    elif cfg.privacy.train_metrics != "off":  # clear; or a client without sample-level DP
        metrics.update({R.TRAIN_LOSS: result.loss,
                        **_accuracy(R.TRAIN_ACCURACY, result.accuracy)})
    return _reply(metrics, _privacy_record(cfg, ledger, transform), model, msg)


def _fingerprint(msg: Message, transform: str) -> str:
    """A digest of what a training reply depends on besides the client's rows and its seed:
    the global model it starts from (names, dtypes, shapes, bytes), the transform and the
    round's config (BLAKE2b, 128 bits)."""
    digest = hashlib.blake2b(digest_size=16)
    R.update_digest(digest, msg.content["arrays"])
    digest.update(transform.encode())
    config = msg.content["config"]
    digest.update(repr(sorted((k, str(config[k])) for k in config.keys())).encode())
    return digest.hexdigest()


def _accuracy(key: str, value: float | None) -> dict:
    """An accuracy metric, or nothing for regression (which has none to send)."""
    return {} if value is None or math.isnan(value) else {key: value}


@app.evaluate()
@_failures_named(**{R.EVAL_LOSS: 0.0, R.EVAL_ACCURACY: 0.0})
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model here: on the held-out share of this client's rows with
    `evaluation.mode = "federated"`, else on all of them (encoded as it encodes them for
    training, which may spend: a client's first need of its private transform)."""
    cfg = _config(context)
    client_id, data_path = A.client_id(context), A.data_path(context)
    ledger = A.open_ledger(cfg, context, client_id, _run(msg))
    fits_now = (cfg.client_private(client_id) and not ledger.current.transform
                and planned(cfg, client_id, data_path))
    try:
        if fits_now and A.plan(cfg, client_id, data_path, ledger,
                               _training_rows(cfg, client_id, data_path)) is None:
            raise BudgetDeclined(f"client {client_id}: earlier runs on its rows left no "
                                 "budget for the fit of its preprocessing")
        transform = own_transform(cfg, client_id, data_path, _transform(msg), ledger)
    except BudgetDeclined as why:
        log.warning("%s; it declines to evaluate", why)
        metrics = {R.CLIENT_ID: client_id, R.NUM_EXAMPLES: 0, R.EVAL_LOSS: 0.0,
                   R.EVAL_ACCURACY: 0.0, R.DECLINED: 1}
        return _reply(metrics, _privacy_record(cfg, ledger), msg=msg)
    args = (cfg, client_id, transform, data_path)
    data = client_holdout(*args) if cfg.evaluation.mode == "federated" else client_data(*args)
    model = _model(cfg, data, msg.content["arrays"], data_path)
    loss, accuracy = evaluate_model(model, data.features, data.labels, loss=cfg.loss_name,
                                    device=resolve_device(cfg.train.device))
    metrics = {R.CLIENT_ID: client_id, R.NUM_EXAMPLES: len(data),
               R.EVAL_LOSS: loss, **_accuracy(R.EVAL_ACCURACY, accuracy)}
    return _reply(metrics, _privacy_record(cfg, ledger, transform), msg=msg)


@app.query("drift_monitor")
@_failures_named()
def drift_monitor(msg: Message, context: Context) -> Message:
    """Drift mode: the noised monitoring of this client's new window (clients.drift)."""
    return drift.monitor(_config(context), msg, context)


@app.train("drift")
@_failures_named()
def drift_train(msg: Message, context: Context) -> Message:
    """Drift mode: DP-SGD on this client's rows of the round's window (clients.drift)."""
    return drift.train(_config(context), msg, context)
