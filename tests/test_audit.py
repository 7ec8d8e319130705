"""Privacy audit: membership inference against the final model of real runs."""

import json
import logging
import math
import shutil

import numpy as np
import pytest
import torch
from test_simulation import privet

from privet.common import audit, results
from privet.common.audit import audit_run, epsilon_lower_bound, max_measurable_epsilon, tpr_at_fpr
from privet.common.config import CONFIGS_DIR, load_config
from privet.common.data import adult, datasets
from privet.common.data.preprocess import fit_local
from privet.common.models import build_model

TINY = CONFIGS_DIR / "tiny.toml"
# 3 clients with 100 rows each, 40 passes of large steps: a model that memorises its rows
# (2 local epochs a round: half the rounds, whose overhead is most of a run's time)
OVERFIT = ["rounds=20", "train.local-epochs=2", "train.hidden=256", "train.lr=0.5",
           "train.batch-size=16", "data.partition=iid", "data.min-rows=10"]


@pytest.fixture(scope="module")
def adult_files(tmp_path_factory):
    """300 training and 600 test rows of Adult, 30% of labels flipped in both files.

    A flipped label can only be predicted by memorising that row, which is what a
    non-private model does and DP-SGD prevents; flipping both files alike keeps members and
    non-members one distribution. 600 test rows leave 300 as the calibrated attack's
    reference set."""
    folder = tmp_path_factory.mktemp("audit-data")
    rng = np.random.default_rng(0)
    paths = {}
    for split, rows in (("train", 300), ("test", 600)):
        frame = adult.load_raw(split).iloc[:rows].copy()
        labels = frame[adult.LABEL].map(adult.normalise_label)
        flip = rng.random(rows) < 0.3
        frame[adult.LABEL] = np.where(flip, np.where(labels == ">50K", "<=50K", ">50K"),
                                      labels)
        paths[split] = folder / f"{split}.csv"
        frame.to_csv(paths[split], index=False, columns=adult.COLUMNS)
    return paths


def simulate(out, files, *overrides):
    sets = [f'data.path="{files["train"]}"', f'data.test-path="{files["test"]}"',
            "data.dataset=csv", "data.label=income", *OVERFIT, *overrides]
    proc = privet("simulate", "--config", str(TINY), "--out", str(out),
                  *(arg for s in sets for arg in ("--set", s)))
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    return out


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory, adult_files):
    return simulate(tmp_path_factory.mktemp("overfit") / "run", adult_files,
                    "privacy.level=none")


@pytest.fixture(scope="module")
def private_run(tmp_path_factory, adult_files):
    return simulate(tmp_path_factory.mktemp("private") / "run", adult_files,
                    "privacy.level=sample", "privacy.epsilon=0.5")


def test_a_memorising_model_gives_membership_away(overfit_run):
    report = audit_run(overfit_run)
    # measured (seeds 0-4): AUC 0.71-0.74, ε_lb 1.87-2.01 of at most 3.4 measurable
    assert report["members"] == report["non_members"] == 300
    assert report["auc"] > 0.65
    assert report["epsilon_lower_bound"] > 1.0
    assert set(report["attacks"]) == {"loss-threshold", "class-calibrated"}
    assert report["attack"] in report["attacks"]
    assert report["epsilon_lower_bound"] == max(
        a["epsilon_lower_bound"] for a in report["attacks"].values())
    assert report["epsilon_lower_bound"] < report["max_measurable_epsilon"] < math.log(300)
    assert set(report["tpr_at_fpr"]) == {"0.01", "0.001"}
    assert all(0 <= v <= 1 for v in report["tpr_at_fpr"].values())
    assert report["theoretical_epsilon"] is None and report["user_level_epsilon"] is None
    assert report["violation"] is False and "no differential privacy" in report["message"]
    assert report["delta"] == 1e-5 and report["confidence"] == 0.95
    assert json.loads((overfit_run / "audit.json").read_text()) == report


def test_a_strongly_private_model_gives_little_away(private_run):
    report = audit_run(private_run)
    # measured (seeds 0-4): AUC 0.48-0.50, ε_lb 0; the AUC's sd with 300 rows is ~0.024
    assert 0.45 < report["theoretical_epsilon"] <= 0.5
    assert report["auc"] < 0.58
    assert report["epsilon_lower_bound"] <= report["theoretical_epsilon"]
    assert report["violation"] is False and "below the accounted" in report["message"]


def test_a_bound_above_the_accounted_epsilon_is_flagged(overfit_run, tmp_path, caplog):
    # the memorising run, relabelled as if its clients had run DP-SGD at ε = 0.5
    lying = tmp_path / "lying"
    shutil.copytree(overfit_run, lying)
    config = (lying / "config.toml").read_text()
    assert 'level = "none"' in config
    (lying / "config.toml").write_text(config.replace('level = "none"', 'level = "sample"'))
    summary = json.loads((lying / "summary.json").read_text())
    for client in summary["privacy"]["clients"].values():
        client["epsilon"] = 0.5
    results.write_json(lying / "summary.json", summary)
    with caplog.at_level(logging.WARNING, logger="privet.common.audit"):
        report = audit_run(lying)
    assert report["theoretical_epsilon"] == 0.5 < report["epsilon_lower_bound"]
    assert report["violation"] is True and report["message"].startswith("VIOLATION")
    assert any("VIOLATION" in r.getMessage() for r in caplog.records)
    assert json.loads((lying / "audit.json").read_text())["violation"] is True


def test_what_is_not_an_auditable_run_is_refused(overfit_run, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path / 'nowhere'}: no such run directory"):
        audit_run(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=f"{tmp_path}: not a privet run directory .*config"):
        audit_run(tmp_path)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(overfit_run, unfinished)
    (unfinished / "model.pt").unlink()
    (unfinished / "audit.json").unlink(missing_ok=True)
    with pytest.raises(ValueError, match=f"{unfinished}: no model.pt"):
        audit_run(unfinished)
    assert not (unfinished / "audit.json").exists()


def test_the_bound_on_synthetic_scores():
    rng = np.random.default_rng(0)
    m = 2000
    # perfectly separated: the most m rows can show, a little under log(m)
    members, non_members = rng.normal(5, 1, m) + 20, rng.normal(0, 1, m)
    ceiling = max_measurable_epsilon(m, m, 1e-5)
    assert epsilon_lower_bound(members, non_members, 1e-5) == pytest.approx(ceiling)
    assert math.log(m) - 3 < ceiling < math.log(m)
    assert max_measurable_epsilon(20 * m, 20 * m, 1e-5) > ceiling + 2.5
    # one distribution: nothing to find
    for seed in range(5):
        same = np.random.default_rng(seed).normal(0, 1, (2, m))
        assert epsilon_lower_bound(same[0], same[1], 1e-5) < 0.05
    # randomised response with ε = 1 is a test at exactly e^ε: the bound gets close, not over
    n, eps = 20_000, 1.0
    p = math.exp(eps) / (1 + math.exp(eps))
    said_member, said_non_member = rng.random(n) < p, rng.random(n) < 1 - p
    found = epsilon_lower_bound(said_member, said_non_member, 1e-5)
    assert 0.85 < found <= eps
    # maximising over more attacks costs confidence
    assert epsilon_lower_bound(said_member, said_non_member, 1e-5, attacks=2) < found
    # thresholds 1 and 0.5 call 0 and 1 (0.6) of the 4 non-members members
    assert tpr_at_fpr([3, 2, 1, 0.5], [0, 0.6, -1, -2], 0.0) == 0.75
    assert tpr_at_fpr([3, 2, 1, 0.5], [0, 0.6, -1, -2], 0.25) == 1.0


def fake_run(run_dir, cfg, transform_json=""):
    """A run directory as a run leaves it, with an untrained model: for the encoding paths
    the Adult runs above do not take (images; a shared, federated transform)."""
    run_dir.mkdir()
    (run_dir / "config.toml").write_text(cfg.to_toml())
    if transform_json:
        (run_dir / "transform.json").write_text(transform_json)
    shape = datasets.client_data(cfg, 0, transform_json).features.shape[1:]
    torch.manual_seed(0)
    model = build_model(cfg.train, shape, datasets.num_classes(cfg))
    torch.save({"round": 1, "state_dict": model.state_dict()}, run_dir / "model.pt")
    clients = {str(c): {"epsilon": cfg.privacy.epsilon, "rounds_trained": int(c != 1)}
               for c in range(cfg.num_clients)}
    results.write_json(run_dir / "summary.json", {
        "status": "complete", "rounds": 1,
        "privacy": {"level": "sample", "delta": cfg.privacy.delta, "user_level": None,
                    "clients": clients}})
    return run_dir


@pytest.mark.parametrize("kind", ["digits", "federated"])
def test_images_and_a_shared_transform_are_encoded_as_clients_did(kind, tmp_path):
    if kind == "digits":
        cfg = load_config(CONFIGS_DIR / "digits.toml", ["num-clients=3", "clients-per-round=3"])
        transform = ""
    else:
        cfg = load_config(TINY, ["preprocess.fit=federated"])
        cleaned, _, _ = datasets.cleaned_client(cfg, 0)
        transform = fit_local(cleaned, datasets.schema(cfg), cfg.preprocess).to_json()
    report = audit_run(fake_run(tmp_path / "run", cfg, transform), max_rows=400)
    assert report["member_clients"] == [0, 2]  # client 1 never trained
    # digits: 360 test images, whose class mix limits how many skewed members they match
    assert report["members"] == report["non_members"] == (234 if kind == "digits" else 400)
    assert abs(report["auc"] - 0.5) < 0.1  # an untrained model knows no one
    assert report["epsilon_lower_bound"] <= report["theoretical_epsilon"]
    assert report["violation"] is False


def test_non_members_match_members_client_by_client_and_class_by_class():
    rng = np.random.default_rng(0)
    member_labels = [np.array([0] * 80 + [1] * 20), np.array([1] * 30), np.array([0] * 5)]
    test_labels = rng.permutation(np.array([0] * 300 + [1] * 60 + [2] * 10))
    members, scored, reference = audit._draw(member_labels, test_labels, 1000, rng)
    assert sum(map(len, members)) == sum(map(len, scored)) == 135  # every member
    for own, rows, theirs in zip(member_labels, members, scored):
        assert len(set(rows)) == len(rows)
        assert sorted(own[rows]) == sorted(test_labels[theirs])
    used = np.concatenate(scored + reference)
    assert len(set(used)) == len(used)  # reference rows are never scored rows
    assert 2 not in test_labels[used]  # no member has class 2
    small, _, _ = audit._draw(member_labels, test_labels, 40, rng)
    assert sum(map(len, small)) == 40
    # 25 test rows of class 1 match the class mix of at most 25 * 135 / 50 = 67 members
    scarce = np.array([0] * 300 + [1] * 25)
    members, scored, _ = audit._draw(member_labels, scarce, 1000, rng)
    assert sum(map(len, members)) == sum(map(len, scored)) == 67
    assert sum(np.sum(own[rows] == 1) for own, rows in zip(member_labels, members)) == 25
