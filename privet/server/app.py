"""Flower ServerApp: config -> strategy -> rounds -> results.

The global model is evaluated on the server's held-out test set after every round;
the run directory is updated as each round finishes.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import random
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.common.logger import update_console_handler
from flwr.serverapp import Grid, ServerApp
from flwr.superlink.grid import InMemoryGrid

from privet import patches
from privet.common import carried
from privet.common import records as R
from privet.common import saved_model
from privet.common.config import ExperimentConfig, from_run_config
from privet.common.data.datasets import classes as class_names
from privet.common.data.datasets import partition_report, source_warnings, test_data
from privet.common.data.datasets import schema as data_schema
from privet.common.data.target import target_scale
from privet.common.device import DeviceError, device_code, device_name, resolve_device
from privet.common.evaluation import Scores, score, score_regression
from privet.common.models import build_model, check_model
from privet.common.privacy.randomness import make_randomness, resolve_noise_source
from privet.common.run_dir import claim as run_dir_claim
from privet.server import accounting, strategies
from privet.server.accounting import BudgetExhausted
from privet.server.checkpoint import (
    Checkpoint,
    CheckpointError,
    check_ledgers,
    load_strategy_state,
    strategy_state,
)
from privet.server.describe import check_node_ids, describe_clients
from privet.server.preprocessing import fit_shared_transform
from privet.server.queries import QueryFailed
from privet.server import drift
from privet.server.recorder import RunRecorder
from privet.server.strategy import NoClientsLeft, PrivetFedAvg
from privet.server.user_dp import UserLevelDPFedAvg

log = logging.getLogger("flwr")
# Flower colours its log lines; not where they go to a file or a pipe
update_console_handler(colored=sys.stderr.isatty())
log.propagate = False  # Flower has its own handler; see experiments/simulation.py
NODE_WAIT_SECONDS = 60
# a resumed run waits this long for the previous ServerApp of the run (left behind by a
# SuperLink that crashed: it exits once it finds its SuperExec gone) to release the run dir
RESUME_WAIT_SECONDS = 180

app = ServerApp()


def run_directory(cfg: ExperimentConfig) -> Path:
    if cfg.out_dir:
        return Path(cfg.out_dir).expanduser().resolve()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return (Path("runs") / f"{cfg.name}-{stamp}").resolve()


class RunFailed(Exception):
    """The run cannot go on (a non-finite global model, no client left to train)."""


def deployed(grid: Grid) -> bool:
    """True unless the ServerApp runs in Flower's simulation (its in-memory grid)."""
    return not isinstance(grid, InMemoryGrid)


def _wait_for_nodes(grid: Grid, expected: int) -> None:
    deadline = time.time() + NODE_WAIT_SECONDS
    while True:
        found = len(list(grid.get_node_ids()))
        if found >= expected:
            if found > expected:
                raise RuntimeError(f"{found} nodes are connected but num-clients = {expected}: "
                                   "each client must map to one partition")
            return
        if time.time() > deadline:
            raise RuntimeError(
                f"only {found} of num-clients = {expected} nodes connected after "
                f"{NODE_WAIT_SECONDS}s; in simulation run with "
                f"--federation-config \"num-supernodes={expected}\"")
        time.sleep(0.5)


@app.main()
def main(grid: Grid, context: Context) -> None:
    patches.install("dp-accounting")  # nothing on stock libraries (privet.patches)
    cfg = from_run_config(context.run_config)
    run_dir = run_directory(cfg)
    noise_source = resolve_noise_source(cfg.privacy.noise_source, deployed(grid),
                                        "the ServerApp")
    resume, pause_after = resume_options(context.run_config)
    saved = None
    if resume:  # CheckpointError: one line (no checkpoint, another config)
        try:
            saved = Checkpoint.load(run_dir, cfg.to_toml())
            check_ledgers(saved, run_dir)
        except CheckpointError as error:
            # a deployment's operator reads it in the streamed log (`privet run --resume`)
            log.error("privet: error: cannot resume: %s", error)
            raise
    # spend recorded under the run id is this run's, on every ledger: a resumed run keeps it
    run = saved.run if saved else uuid.uuid4().hex[:16]
    random.seed(cfg.seed)  # Flower samples clients with the `random` module
    torch.manual_seed(cfg.seed)
    _wait_for_nodes(grid, cfg.num_clients)
    if cfg.drift.source:  # windows of rows arriving over time: its own loop
        if resume:
            raise RunFailed("drift mode cannot be resumed yet: start the run again")
        try:
            return drift.main(grid, cfg, run_dir, run, deployed(grid))
        except drift.DriftRunFailed as reason:
            raise RunFailed(str(reason)) from None
    if saved:  # the ServerApp a crashed SuperLink left behind may still hold the directory
        run_dir_claim(run_dir, option="out-dir", wait=RESUME_WAIT_SECONDS,
                      waiting=lambda pid: log.info(
                          "privet: waiting up to %ds for the run's previous ServerApp (pid %s) "
                          "to let go of %s", RESUME_WAIT_SECONDS, pid, run_dir))

    recorder = RunRecorder(run_dir, cfg, run=run, noise_source=noise_source,
                           restored=saved.recorder if saved else None)
    log.info("privet: run directory %s", run_dir)
    if saved:
        log.info("privet: resuming run %s after round %d of %d", run, saved.round, cfg.rounds)
    status = "failed"
    try:
        paused = _run(grid, cfg, recorder, run, noise_source, saved, pause_after)
        _check_something_trained(recorder.round_rows)
        status = ("paused" if paused else
                  "complete-with-failures" if recorder.failures else "complete")
    except BudgetExhausted as reason:
        status = "budget-exhausted"
        recorder.stop_reason = str(reason)
        log.warning("privet: stopping after round %d: %s", len(recorder.round_rows), reason)
    except QueryFailed as reason:  # before any node trained: one line, no traceback
        if deployed(grid):  # the operator reads it in the streamed log; simulate prints it
            log.error("privet: error: %s", reason)
        raise RunFailed(str(reason)) from None
    except (NoClientsLeft, RunFailed) as reason:
        # a deployment's operator reads it in the streamed log; `privet simulate` prints it
        log.warning("privet: the run failed after round %d: %s", len(recorder.round_rows),
                    reason)
        raise RunFailed(str(reason)) from None
    except OSError as error:  # the disk filled up, the folder went away: what is kept
        done = len(recorder.round_rows)
        if not _writing_results(error, run_dir):  # e.g. a data file that is not there
            log.warning("privet: the run failed after round %d: %s", done, error)
            raise RunFailed(str(error)) from None
        raise RunFailed(f"{run_dir}: {(error.strerror or str(error)).lower()} while writing the "
                        f"results of round {done + 1}; "
                        + (f"rounds 1-{done} are kept" if done else "no round was finished")
                        ) from None
    except KeyboardInterrupt:
        status = "interrupted"
        raise
    finally:
        try:
            recorder.finish(status)
        except OSError as error:  # a full disk: the last summary written stays
            log.warning("privet: could not write the final summary: %s", error)
        log.info("privet: %s after %d round(s); results in %s", status,
                 len(recorder.round_rows), run_dir)
        if deployed(grid):  # `privet run` copies them to the operator's machine
            carry_results(run_dir)


def carry_results(run_dir: Path) -> None:
    """The run directory's result files into the log, for `privet run` (common.carried):
    Flower 1.41 OSS brings the operator nothing else. Spread over Flower's log uploads
    (every 0.2 s) and given a moment to leave before the ServerApp exits."""
    try:
        lines = carried.block(run_dir)
    except OSError as error:
        log.warning("privet: the results could not be read for privet run: %s", error)
        return
    for i, line in enumerate(lines):
        log.info("%s", line)
        if i % 200 == 199:
            time.sleep(0.3)
    time.sleep(1.0)


def evaluation_device(cfg: ExperimentConfig, deployed_run: bool) -> torch.device:
    """Where the server evaluates the global model: `train.device` resolved on this machine
    (common.device). Raises DeviceError for a GPU this machine lacks in simulation (where
    privet simulate refuses it before the run); a deployed server, whose machine is not the
    clients', then evaluates on the CPU and logs why."""
    try:
        return resolve_device(cfg.train.device)
    except DeviceError as why:
        if not deployed_run:
            raise
        log.warning("privet: %s; the server evaluates on the CPU (each client trains where "
                    "train.device says on its own machine)", why)
        return torch.device("cpu")


def _check_something_trained(rounds: list[dict]) -> None:
    """A run in which no client ever trained learnt nothing: never "complete". Raises
    BudgetExhausted when clients declined (no budget left), else RunFailed."""
    if not rounds or any(int(r["clients_trained"]) for r in rounds):
        return
    if any(int(r["clients_declined"]) for r in rounds):
        raise BudgetExhausted("no client trained in any round: their rows had no budget left")
    raise RunFailed("no client trained in any round: every sampled client failed or had "
                    "fewer rows than train.batch-size")


def resume_options(run_config) -> tuple[bool, int]:
    """(resume, pause after round): the run_config keys `privet simulate --resume` and
    `--pause-after` set (config.EXECUTION_KEYS: how to run, not what)."""
    return bool(run_config.get("resume", False)), int(run_config.get("pause-after", 0))


def _run(grid: Grid, cfg: ExperimentConfig, recorder: RunRecorder, run: str,
         noise_source: str, saved: Checkpoint | None = None, pause_after: int = 0) -> bool:
    """Everything from the data description to the last round, or from the round after the
    checkpoint `saved`; raises BudgetExhausted when budgets run out before the planned
    rounds are done. True when it paused after round `pause_after` (a checkpoint to resume
    from is written)."""
    on_clients = cfg.evaluation.mode == "federated"  # then the server reads no rows at all
    transform = ""
    # a deployment's nodes each hold their own data: they say what it is (and which
    # partition-id they are: two nodes with one are refused here, before anything is spent)
    described = (describe_clients(grid)
                 if saved is None and (on_clients or deployed(grid)) else None)
    if saved is not None:  # described and fitted before round 1, paid for once: reused
        transform = saved.transform
        input_shape, classes, features = saved.model_input
        if deployed(grid):  # nodes that came back: still one partition-id each
            check_node_ids(grid)
    elif described is not None:
        recorder.write_partitions(described.report)
        recorder.note_described(described.report)
        input_shape, classes = described.input_shape, described.classes
        features = described.features  # a local fit's columns: the schema's
    else:  # simulation: the clients' partitions are this split of the shared dataset
        recorder.write_partitions(partition_report(cfg))
    if saved is None and not on_clients:  # the server's own (test) data
        recorder.data_warnings = list(source_warnings(cfg))
    if cfg.federated_preprocessing and saved is None:
        fitted, estimated = fit_shared_transform(grid, cfg, run, recorder.record_statistics)
        transform = fitted.to_json()
        recorder.write_transform(fitted, estimated)
        input_shape = (len(fitted.feature_names()),)
        features = fitted.features()  # what every client gets with the transform
    device = None
    if not on_clients:
        test = test_data(cfg, transform)
        input_shape = test.features.shape[1:]
        classes = [] if cfg.regression else class_names(cfg)
        features = test.feature_spec
        device = evaluation_device(cfg, deployed(grid))
        recorder.server_device = device_name(device_code(device))
    recorder.classes = [str(c) for c in classes]
    scale = target_scale(cfg)  # regression: scores in the label's units
    outputs = 1 if cfg.regression else len(classes)  # the classes: not read here on_clients
    check_model(cfg.train, tuple(input_shape), outputs, features,  # ModelError: one line
                dp_sgd=cfg.private)
    recorder.write_model_spec(saved_model.describe(  # before round 1: the run dir suffices
        cfg, input_shape, classes, features, transform,
        data_schema(cfg) if not on_clients and cfg.data.tabular else None))
    model = build_model(cfg.train, tuple(input_shape), outputs, features)
    user_account = None
    if cfg.user_level:
        user_account = accounting.user_ledger(cfg, run, deployed(grid), noise_source,
                                              recorder.run_dir)
        recorder.user_ledger = user_account
    strategy = build_strategy(cfg, recorder, user_account, noise_source)
    if strategy is not None:
        strategy.left_out.update(recorder.failed_nodes)  # failed in preprocessing
    first_round, arrays = 1, R.to_arrays(model)
    if saved is not None and strategy is not None:
        load_strategy_state(strategy, saved.strategy)
        saved.restore_random()
        first_round, arrays = saved.round + 1, ArrayRecord(saved.arrays)
    model_input = (tuple(input_shape), list(classes), features)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if on_clients:  # the clients just evaluated this round's model on held-out rows
            if server_round == 0:
                return None
            held_out = strategy.last_evaluation
            scores = Scores(float(held_out.get(R.EVAL_LOSS, math.nan)),
                            float(held_out.get(R.EVAL_ACCURACY, math.nan)))
        elif scale is not None:
            R.load_arrays(model, arrays)
            scores = score_regression(model, test.features, test.labels, scale, cfg.loss_name,
                                      device=device)
        else:
            R.load_arrays(model, arrays)
            scores = score(model, test.features, test.labels, len(classes), device=device)
        if server_round > 0 and not all(np.isfinite(a.numpy()).all() for a in arrays.values()):
            raise RunFailed(f"round {server_round}: the global model's weights are not finite "
                            "(NaN or infinite): training diverged (lower train.lr?)")
        if server_round > 0:
            state = arrays.to_torch_state_dict()
            recorder.end_round(server_round, scores, state)
            recorder.checkpoint(lambda kept: Checkpoint(
                server_round, run, cfg.to_toml(), state, strategy_state(strategy), kept,
                transform, model_input, random.getstate(), torch.get_rng_state()))
            log.info("privet: round %d/%d  %s  max ε %s  user ε %s",
                     server_round, cfg.rounds, _headline(scores), _eps(recorder.max_epsilon()),
                     _eps(recorder.user_epsilon()))
            able = cfg.num_clients - len(recorder.exhausted_clients()) \
                - len(recorder.left_out_clients())
            if cfg.privacy.on_exhausted == "stop" and able < cfg.clients_per_round:
                raise BudgetExhausted(f"only {able} client(s) have budget left; "
                                      f"clients-per-round = {cfg.clients_per_round}")
            arrays_now[0] = arrays
            # a run paused here reserves the next round when it resumes (secure noise
            # would otherwise pay it twice)
            if user_account is not None and server_round not in (cfg.rounds, pause_after):
                reserve_user_round()
        if scale is not None:
            return MetricRecord({"rmse": scores.rmse, "loss": scores.loss})
        return MetricRecord({"accuracy": scores.accuracy, "loss": scores.loss})

    def reserve_user_round() -> None:
        """The next round's release, recorded before it runs, in one step with the check
        (another run may share the ledger folder). Its fingerprint is the model it starts
        from and the seeded noise stream's position: a resumed run replaying it from the
        checkpoint draws the same noise, and pays nothing more (DataLedger.reserve)."""
        release = (f"round-{len(recorder.round_rows) + 1}",
                   _fingerprint(arrays_now[0], strategy.randomness))
        if accounting.reserve_round(cfg, user_account, strategy.ledger_noise,
                                    strategy.sample_rate, release) is None:
            raise BudgetExhausted(f"another round would take the participants' user-level "
                                  f"ε past target {cfg.privacy.user_epsilon:g}")

    if strategy is None:
        raise BudgetExhausted("earlier runs have spent the participants' user-level budget "
                              f"(ε = {cfg.privacy.user_epsilon:g}) in {user_account.location}")
    arrays_now = [arrays]  # the global model the next round starts from
    if user_account is not None:
        reserve_user_round()
    strategy.start(grid=grid, initial_arrays=arrays, num_rounds=cfg.rounds,
                   train_config=ConfigRecord({R.TRANSFORM: transform, R.RUN: run,
                                              # fedprox also at user level (FedAvg's server)
                                              "proximal-mu": proximal_mu(cfg)}),
                   evaluate_config=ConfigRecord({R.TRANSFORM: transform, R.RUN: run}),
                   evaluate_fn=evaluate, first_round=first_round,
                   stop=lambda done: done == pause_after)
    last = int(recorder.round_rows[-1]["round"]) if recorder.round_rows else 0
    return 0 < pause_after == last < cfg.rounds


def _fingerprint(arrays: ArrayRecord, randomness) -> str:
    """A digest of a user-level round's inputs besides the clients' updates: the global model
    it starts from and, for seeded noise, the stream's position (BLAKE2b, 128 bits)."""
    digest = hashlib.blake2b(digest_size=16)
    R.update_digest(digest, arrays)
    state = getattr(randomness, "state_dict", None)
    for key, value in sorted(state().items()) if callable(state) else ():
        digest.update(key.encode())
        digest.update(value.numpy().tobytes() if isinstance(value, torch.Tensor)
                      else repr(value).encode())
    return digest.hexdigest()


def _writing_results(error: OSError, run_dir: Path) -> bool:
    """Whether `error` is one of writing the run directory (a full or read-only disk, or a
    file under `run_dir`), rather than of reading something else."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return True
    if not error.filename:
        return False
    run, name = Path(run_dir).resolve(), Path(error.filename).resolve()
    return name == run or run in name.parents


def proximal_mu(cfg: ExperimentConfig) -> float:
    """μ of FedProx's proximal term the clients add (0 but for `strategy.name = "fedprox"`)."""
    return cfg.strategy.proximal_mu if cfg.strategy.name == "fedprox" else 0.0


def build_strategy(cfg: ExperimentConfig, recorder: RunRecorder,
                   user_account=None, noise_source: str = "seeded") -> PrivetFedAvg | None:
    """The strategy `[strategy] name` names (server.strategies), or DP-FedAvg at user level
    (None when earlier runs have spent the user-level budget: there is then nothing to
    run)."""
    common = dict(on_train_replies=recorder.record_replies,
                  on_evaluate_replies=recorder.record_evaluations,
                  fraction_evaluate=1.0 if cfg.evaluation.mode == "federated" else 0.0,
                  min_evaluate_nodes=1, min_available_nodes=cfg.min_clients)
    if not cfg.user_level:
        chosen = strategies.strategy_class(cfg.strategy.name)
        return chosen(fraction_train=cfg.clients_per_round / cfg.num_clients,
                      clients_per_round=cfg.clients_per_round, seed=cfg.seed,
                      **strategies.options(cfg), **common)
    p = cfg.privacy
    sigma = accounting.calibrate(cfg, user_account)
    if sigma is None:
        return None
    log.info("privet: user-level DP: σ = %.4f, S = %g, p = %.4f over %d rounds", sigma,
             p.user_clip, cfg.client_sample_rate, cfg.rounds)
    strategy = UserLevelDPFedAvg(noise_multiplier=sigma, clip=p.user_clip,
                                 sample_rate=cfg.client_sample_rate,
                                 num_clients=cfg.num_clients, seed=cfg.seed,
                                 adaptive=p.user_clipping == "adaptive",
                                 target_quantile=p.user_clip_quantile, clip_lr=p.user_clip_lr,
                                 count_stddev=p.user_count_stddev or None,
                                 randomness=make_randomness(noise_source, [cfg.seed, 0x05E4]),
                                 server_optimizer=strategies.server_optimizer(cfg), **common)
    recorder.user_strategy = strategy
    return strategy


def _headline(scores) -> str:
    if isinstance(scores, Scores):
        return f"test accuracy {scores.accuracy:.4f}"
    return f"test RMSE {scores.rmse:.4g}  R² {scores.r2:.4f}"


def _eps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
