"""Randomness the server cannot know: a deployed client's DP noise is drawn from OS entropy,
so whoever submits the run (and knows its seed) cannot replay it and subtract it."""

import copy
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from test_simulation import privet
from test_user_dp import task_identity  # noqa: F401 (a fixture)

from privet.clients import accounting as client_accounting
from privet.clients import app as client_app
from privet.clients.train import train_local
from privet.common import records as R
from privet.common.config import CONFIGS_DIR, load_config
from privet.common.data import adult
from privet.common.data.preprocess import FittedTransform, clean, fit_local
from privet.common.models import build_model
from privet.common.privacy.randomness import NoiseSourceError, resolve_noise_source

TINY = CONFIGS_DIR / "tiny.toml"


def _ctx(node_config):
    return SimpleNamespace(node_config=node_config, state=RecordDict())


@pytest.mark.parametrize("requested, node, expected", [
    ("auto", {"partition-id": 0, "num-partitions": 3}, "seeded"),   # simulation
    ("secure", {"partition-id": 0, "num-partitions": 3}, "secure"),
    ("auto", {"partition-id": 0, "data-path": "/data/mine.csv"}, "secure"),  # deployed
    ("secure", {"partition-id": 0}, "secure"),                     # deployed, shipped data
    ("seeded", {"partition-id": 0, "data-path": "/data/mine.csv"}, NoiseSourceError),
    ("seeded", {"partition-id": 0, "num-partitions": 3, "data-path": "/x.csv"},
     NoiseSourceError),
])
def test_a_deployed_node_always_draws_secure_noise(requested, node, expected):
    cfg = load_config(TINY, [f"privacy.noise-source={requested}"])
    if expected is NoiseSourceError:
        with pytest.raises(NoiseSourceError, match="refused by node partition-id=0"):
            client_accounting.noise_source(cfg, _ctx(node))
    else:
        assert client_accounting.noise_source(cfg, _ctx(node)) == expected


def test_the_server_side_refuses_seeded_noise_in_deployment():
    with pytest.raises(NoiseSourceError, match="ServerApp"):
        resolve_noise_source("seeded", True, "the ServerApp")
    assert resolve_noise_source("auto", True) == "secure"
    with pytest.raises(ValueError, match="expected one of auto, seeded, secure"):
        resolve_noise_source("fast", False)


# --- the audit's replay attack, through the ClientApp's own train function ---------------

ROUND, SEED = 3, 42


def _member_files(tmp_path, trial, member):
    """A node's file: 300 Adult rows, plus the target row when `member`."""
    raw = adult.load_raw("train")
    others, target = raw.iloc[1000:1300], raw.iloc[[5]]
    frame = (others if not member else
             np.concatenate([others.to_numpy(), target.to_numpy()]))
    path = tmp_path / f"trial{trial}" / "data.csv"
    path.parent.mkdir(parents=True)
    import pandas as pd

    pd.DataFrame(np.asarray(frame), columns=adult.COLUMNS).to_csv(path, index=False)
    return path


def _config(data_path):
    return load_config(CONFIGS_DIR / "adult.toml", [
        "num-clients=1", "clients-per-round=1", "rounds=5", f"seed={SEED}",
        "train.batch-size=64", "preprocess.fit=federated"])


def _shared_transform(cfg, path):
    """What the server sends: a transform fitted on public rows (here, the test split)."""
    from privet.common.data.datasets import schema, test_rows

    frame, _ = test_rows(cfg)
    return fit_local(frame, schema(cfg), cfg.preprocess).to_json()


def _client_update(cfg, node_config, transform, initial):
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(),
                      run_config=cfg.to_run_config())
    msg = Message(RecordDict({"arrays": initial, "config": ConfigRecord({
        "server-round": ROUND, R.TRANSFORM: transform, R.RUN: "audit"})}),
        dst_node_id=1, message_type="train")
    reply = client_app.train(msg, context)
    metrics = reply.content["metrics"]
    state = reply.content["arrays"].to_torch_state_dict()
    return torch.cat([v.flatten() for v in state.values()]), float(metrics[R.NOISE_MULTIPLIER])


def _replay(cfg, transform, initial, sigma, with_target):
    """The attacker: it knows the config and seed (it submitted them), the initial model, the
    shared transform, the other rows and the target row; it replays both worlds."""
    from privet.common.data.datasets import encode_labels, schema

    raw = adult.load_raw("train")
    rows = raw.iloc[list(range(1000, 1300)) + ([5] if with_target else [])]
    table = schema(cfg)
    cleaned, _ = clean(rows, numeric=list(table.numeric), label=table.label,
                       missing_markers=["?", "NA", "N/A", "NaN", "null", "None"])
    x = FittedTransform.from_json(transform).apply(cleaned)
    y = encode_labels(cleaned[table.label], table.classes, "replay")
    model = build_model(cfg.train, x.shape[1:], 2)
    model.load_state_dict(initial.to_torch_state_dict())
    seed = cfg.seed * 1_000_003 + ROUND * 1009 + 0
    train_local(model, x, y, epochs=1, batch_size=cfg.train.batch_size, lr=cfg.train.lr,
                momentum=cfg.train.momentum, seed=seed, noise_multiplier=sigma,
                max_grad_norm=cfg.privacy.max_grad_norm, grad_sample_mode="bookkeeping")
    return torch.cat([p.detach().flatten() for p in model.state_dict().values()])


@pytest.mark.parametrize("as_before", [True, False])
def test_whoever_knows_the_seed_cannot_replay_a_deployed_clients_noise(
        tmp_path, task_identity, monkeypatch, as_before):
    """The audit's attack (shared/cases/privacy/noise_predictable_from_run_config): replay
    the client's training on D and D ∪ {target} and see which reproduces its update. With
    the noise seeded as before (`as_before`: the node is made to resolve "seeded", the
    positive control that the replay is exact) membership is decided with certainty. As
    deployed, the noise comes from OS entropy: no replay reproduces the update, and the
    guess is no better than always saying "not a member"."""
    if as_before:
        monkeypatch.setattr(client_accounting, "resolve_noise_source", lambda *a, **k: "seeded")
    wins, matched = 0, 0
    for trial, member in enumerate([True, False] * 3):
        path = _member_files(tmp_path, trial, member)
        cfg = _config(path)
        node = {"partition-id": 0, "data-path": str(path)}
        transform = _shared_transform(load_config(CONFIGS_DIR / "adult.toml"), path)
        width = FittedTransform.from_json(transform).apply(
            clean(adult.load_raw("train").iloc[:2], numeric=adult.NUMERIC, label=adult.LABEL,
                  missing_markers=["?"])[0]).shape[1]
        torch.manual_seed(trial)
        initial = ArrayRecord(build_model(cfg.train, (width,), 2).state_dict())
        observed, sigma = _client_update(cfg, node, transform, initial)
        assert sigma > 0
        in_world = _replay(cfg, transform, initial, sigma, True)
        out_world = _replay(cfg, transform, initial, sigma, False)
        matched += torch.equal(observed, in_world) + torch.equal(observed, out_world)
        guess = bool(torch.equal(observed, in_world)) and not torch.equal(observed, out_world)
        wins += guess == member
    if as_before:
        assert matched == 6 and wins == 6  # every update replayed: membership certain
    else:
        assert matched == 0 and wins == 3  # chance: right only about the non-members


def test_the_replay_reproduces_a_seeded_update_exactly():
    """The positive control at the level of local training: with the seed, the update of a
    client is a deterministic function the attacker can compute."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 10)).astype(np.float32)
    y = rng.integers(0, 2, 300)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        train_local(m, x, y, epochs=1, batch_size=64, lr=0.2, momentum=0.8, seed=7,
                    noise_multiplier=1.0, grad_sample_mode="bookkeeping")
        runs.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(*runs)


@pytest.mark.slow  # a whole run or several: CI's slow job runs it
def test_two_secure_runs_of_one_config_and_seed_draw_different_noise(tmp_path):
    outs = []
    for name in ("a", "b", "c"):
        secure = name != "c"
        args = ["simulate", "--config", str(TINY), "--out", str(tmp_path / name),
                "--set", f"privacy.noise-source={'secure' if secure else 'seeded'}"]
        proc = privet(*args)
        stdout, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, stdout[-2000:]
        outs.append(tmp_path / name)
    models = [torch.load(o / "model.pt")["state_dict"] for o in outs]
    summaries = [json.loads((o / "summary.json").read_text()) for o in outs]
    assert any(not torch.equal(models[0][k], models[1][k]) for k in models[0])
    for a, b in zip(summaries[0]["privacy"]["clients"].values(),
                    summaries[1]["privacy"]["clients"].values()):
        assert a["noise_source"] == b["noise_source"] == "secure"
        assert a["epsilon"] == pytest.approx(b["epsilon"], rel=1e-9)  # same σ, q, steps
    assert summaries[0]["privacy"]["noise_source"] == "secure"
    assert not any("seeded" in line for line in summaries[0]["privacy"]["not_covered"])
    assert any("seeded" in line for line in summaries[2]["privacy"]["not_covered"])


def test_privet_run_refuses_seeded_noise_before_submitting():
    from typer.testing import CliRunner

    from privet.experiments.cli import app

    result = CliRunner().invoke(app, ["run", "--federation", "nowhere", "--set",
                                      "privacy.noise-source=seeded"])
    assert result.exit_code == 2
    assert "refused by privet run" in " ".join(result.output.split())
