"""Every spend shown, preprocessing inside the ε, and what is still sent in the clear."""

import json
import math

import dp_accounting
import numpy as np
import pandas as pd
import pytest
from dp_accounting.pld import pld_privacy_accountant
from independent import pld_epsilon
from test_simulation import privet, rows

from privet.common.config import CONFIGS_DIR, load_config
from privet.common.data import adult, federated
from privet.common.data.datasets import cleaned_client, schema

TINY = CONFIGS_DIR / "tiny.toml"


def simulate(out, *settings):
    args = ["simulate", "--config", str(TINY), "--out", str(out)]
    for setting in settings:
        args += ["--set", setting]
    proc = privet(*args)
    stdout, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, stdout[-3000:]
    return json.loads((out / "summary.json").read_text()), stdout


def gaussian_epsilon(sigma, delta, times=1):
    accountant = pld_privacy_accountant.PLDAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(sigma), times)
    return accountant.get_epsilon(delta)


def test_clients_never_sampled_still_report_what_preprocessing_cost_them(tmp_path):
    """shared/cases/privacy/preprocess_eps_missing_for_unsampled_clients: every client pays
    for the federated statistics before round 1, sampled for training or not."""
    summary, stdout = simulate(tmp_path / "run", "num-clients=6", "clients-per-round=2",
                               "rounds=2")
    clients = summary["privacy"]["clients"]
    assert sorted(clients, key=int) == [str(c) for c in range(6)]
    never = [c for c, e in clients.items() if e["rounds_trained"] == 0]
    assert never, "with 2 of 6 sampled in 2 rounds some client is never sampled"
    delta = summary["privacy"]["delta"]
    for cid, entry in clients.items():
        statistics = [h for h, p in zip(entry["history"], entry["purposes"])
                      if p in ("bounds", "statistics")]
        assert statistics and all(q == 1.0 and n == 1 for _, q, n in statistics)
        alone = pld_epsilon(statistics, delta)
        assert alone <= 0.3 * 1.001 and alone == pytest.approx(0.3, rel=0.02)
        assert entry["epsilon"] == pytest.approx(pld_epsilon(entry["history"], delta), rel=0.01)
        assert entry["noise_source"] == "seeded"
        # this run's only, kept in its run directory (so that --resume continues it)
        assert entry["ledger"]["location"] == \
            f"{tmp_path / 'run' / 'ledgers' / f'client-{cid}.json'} (this run only)"
    for cid in never:
        assert clients[cid]["epsilon"] == pytest.approx(0.3, rel=0.02)
        assert set(clients[cid]["spent_on"]) == {"statistics"}
    table = stdout[stdout.index("ε spent"):]
    for cid in range(6):  # the console lists them all (fewer than 20)
        assert f"│ {cid:>6} │" in table


def test_a_clients_own_fit_is_dp_and_charged_once(tmp_path):
    """preprocess.fit = "local": each client fits its transform from noised statistics of its
    own rows, charged once (not every round) before its DP-SGD; the σ of that release alone
    reaches preprocess.epsilon (dp-accounting, directly), and the reported ε composes both."""
    summary, _ = simulate(tmp_path / "run", "preprocess.fit=local")
    delta = summary["privacy"]["delta"]
    sent = json.loads((tmp_path / "run" / "client_transforms.json").read_text())
    for cid, entry in summary["privacy"]["clients"].items():
        assert entry["purposes"].count("local-fit") == 1 and entry["rounds_trained"] == 2
        (sigma, q, n), = [h for h, p in zip(entry["history"], entry["purposes"])
                          if p == "local-fit"]
        assert (q, n) == (1.0, 1)
        assert gaussian_epsilon(sigma, delta) == pytest.approx(0.3, rel=0.01)
        assert entry["epsilon"] == pytest.approx(pld_epsilon(entry["history"], delta), rel=0.01)
        assert entry["epsilon"] <= entry["target_epsilon"] * 1.001
        assert set(sent[cid]) >= {"numeric", "categorical"}  # a DP release: sent, kept


def test_one_extreme_row_moves_the_statistics_by_at_most_their_sensitivity():
    """The issue's probe: one added row with capital-gain 1e6. Without DP it changed every
    other row's encoding; the statistics the encoding is now fitted from move by at most
    the sensitivity their noise is scaled to, range estimate included."""
    cfg = load_config(CONFIGS_DIR / "adult.toml")
    table = schema(cfg)
    frame, labels, _ = cleaned_client(cfg, 0)
    extreme = frame.iloc[[0]].copy()
    extreme["capital-gain"] = 1e6
    grown = pd.concat([frame, extreme], ignore_index=True)
    grown_labels = np.concatenate([labels, labels[:1]])
    base = federated.client_statistics(frame, labels, table, 64)
    more = federated.client_statistics(grown, grown_labels, table, 64)
    change = math.sqrt(sum(((more[k] - base[k]) ** 2).sum() for k in base))
    assert 1.0 < change <= federated.stats_sensitivity(table) + 1e-9
    undeclared = ("capital-gain", "age")
    base = federated.bounds_statistics(frame, undeclared)
    more = federated.bounds_statistics(grown, undeclared)
    change = math.sqrt(sum(((more[k] - base[k]) ** 2).sum() for k in base))
    assert 0 < change <= federated.bounds_sensitivity(undeclared) + 1e-9


def test_ranges_estimated_with_dp_cover_most_rows_and_cost_one_round():
    """Undeclared bounds: found from noised magnitude-bin counts (post-processing only)."""
    cfg = load_config(CONFIGS_DIR / "adult.toml")
    frame, _, _ = cleaned_client(cfg, 1)
    columns = tuple(adult.NUMERIC)
    from privet.common.privacy.randomness import SeededRandomness

    std = 16.0 * federated.bounds_sensitivity(columns)
    noisy = federated.add_noise(federated.bounds_statistics(frame, columns), std,
                                SeededRandomness(0))
    found = federated.fit_bounds(noisy, columns, std)
    for column, (low, high) in found.items():
        values = frame[column].dropna().to_numpy(dtype=float)
        inside = ((values >= low) & (values <= high)).mean()
        assert low < high and inside > 0.5, (column, low, high, inside)
    assert found["age"][0] >= 16 and found["age"][1] <= 128


def test_training_metrics_are_listed_as_sent_in_the_clear_or_withheld(tmp_path):
    shown, stdout = simulate(tmp_path / "shown")
    clear = shown["privacy"]["released_in_clear"]
    assert {"train-loss", "train-accuracy", "num-examples"} <= set(clear["0"])
    assert any("train-loss" in line for line in shown["privacy"]["not_covered"])
    assert "not covered by ε" in stdout
    hidden, _ = simulate(tmp_path / "hidden", "privacy.train-metrics=off")
    assert not {"train-loss", "train-accuracy"} & set(hidden["privacy"]["released_in_clear"]["0"])
    trained = [r for r in rows(tmp_path / "hidden" / "metrics.csv") if r["status"] == "trained"]
    assert trained and all(r["loss"] == "" and r["accuracy"] == "" for r in trained)


def test_noised_training_metrics_are_charged_and_no_longer_in_the_clear(tmp_path):
    """privacy.train-metrics = "noised": one Gaussian release per trained round whose σ alone
    spends train-metrics-epsilon over the run's rounds (dp-accounting, directly); the reported
    ε composes it with the rest and stays within the target; the metrics leave the list of
    what is sent in the clear, and stay readable."""
    summary, _ = simulate(tmp_path / "run", "privacy.train-metrics=noised",
                          "privacy.train-metrics-epsilon=0.5")
    delta, rounds = summary["privacy"]["delta"], summary["planned_rounds"]
    for cid, entry in summary["privacy"]["clients"].items():
        released = [h for h, p in zip(entry["history"], entry["purposes"])
                    if p == "train-metrics"]
        assert len(released) == entry["rounds_trained"] == rounds
        (sigma, q, n), = set(map(tuple, released))
        assert (q, n) == (1.0, 1)
        assert gaussian_epsilon(sigma, delta, rounds) == pytest.approx(0.5, rel=0.01)
        assert entry["epsilon"] == pytest.approx(pld_epsilon(entry["history"], delta), rel=0.01)
        assert entry["epsilon"] <= entry["target_epsilon"] * 1.001
        assert not {"train-loss", "train-accuracy"} & set(
            summary["privacy"]["released_in_clear"][cid])
    trained = [r for r in rows(tmp_path / "run" / "metrics.csv") if r["status"] == "trained"]
    assert all(0 <= float(r["loss"]) <= 4 and 0 <= float(r["accuracy"]) <= 1 for r in trained)


def test_metrics_sums_move_by_at_most_one_per_row():
    """The sensitivity the metrics' noise is sized for, probed by adding one row (the worst a
    row can do: a confident wrong answer, with its loss clipped)."""
    import torch

    from privet.clients import metrics

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    features = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int64)
    base = np.array(metrics.clipped_sums(model, features, labels))
    for extra in ([1e6, 0, 0], [-1e6, 0, 0], [0.1, 0.2, 0.3]):
        for label in (0, 1):
            more = np.array(metrics.clipped_sums(
                model, np.vstack([features, np.float32([extra])]),
                np.append(labels, np.int64(label))))
            assert np.all(np.abs(more - base) <= 1 + 1e-6)
            assert np.linalg.norm(more - base) <= metrics.SENSITIVITY + 1e-6


def test_noised_metrics_at_user_level_are_refused_in_one_line(tmp_path):
    proc = privet("simulate", "--config", str(TINY), "--out", str(tmp_path / "run"),
                  "--set", "privacy.level=user", "--set", "privacy.train-metrics=noised")
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert "privacy.train-metrics" in stdout and "Traceback" not in stdout
