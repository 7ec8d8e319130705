"""Drift mode: windows over time, DP monitoring, detection, retraining (privet.common.drift).

The privacy checks are independent of privet's own accountant: a window's ε is recomputed
with dp-accounting from the events its ledger holds, and the monitoring vector's
sensitivity is probed by adding one row to a noise-free query."""

import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
import torch
from dp_accounting.pld import pld_privacy_accountant
from test_simulation import privet, rows

from privet.common.config import CONFIGS_DIR, ConfigError, load_config
from privet.common.drift import accounting, signals, streams
from privet.common.drift.detect import DriftMonitor, score
from privet.common.drift.policy import RetrainPolicy
from privet.common.models import build_model

pytest.importorskip("river")
AGRAWAL = CONFIGS_DIR / "drift-agrawal.toml"
SMALL = ["rounds=8", "num-clients=3", "clients-per-round=3", "drift.rows-per-window=300",
         "drift.drift-round=5", "drift.warmup-rounds=3", "drift.test-rows=50"]


def small(*more: str):
    return load_config(AGRAWAL, SMALL + list(more))


def test_rows_arrive_in_disjoint_windows_and_the_drift_hits_only_the_chosen_clients():
    cfg = small("drift.drift-clients=1", "num-clients=3")
    hit = streams.drifted_clients(cfg)
    assert len(hit) == 1
    whole = streams._client_stream(cfg, hit[0], "train")
    parts = [streams.window(cfg, hit[0], w) for w in range(streams.num_windows(cfg))]
    assert np.array_equal(np.concatenate([p.features for p in parts]), whole[0])
    assert all(len(p) == 300 for p in parts)
    assert streams.true_drift_rounds(cfg) == [5]
    # the same seeds without a drift: identical rows before window 4, other labels after
    calm = small("drift.drift-clients=1", "num-clients=3", "drift.drift-round=0")
    other = [c for c in range(3) if c not in hit][0]
    for client, changes in ((hit[0], True), (other, False)):
        before = streams.window(cfg, client, 3).labels, streams.window(calm, client, 3).labels
        assert np.array_equal(*before)
        after = streams.window(cfg, client, 5), streams.window(calm, client, 5)
        assert (not np.array_equal(after[0].labels, after[1].labels)) == changes


def test_the_monitoring_vector_moves_by_at_most_its_sensitivity_for_one_row_more():
    """One-row-more probe of the noise-free query, with the rows that move it most: a row
    whose every feature sits in its own bin, misclassified at the clipped loss."""
    cfg = small()
    w = streams.window(cfg, 0, 0)
    torch.manual_seed(0)
    model = build_model(cfg.train, (w.features.shape[1],), 2)
    base = signals.client_statistics(model, w.features, w.labels, 5, streams.model_input)
    bound = signals.sensitivity(w.features.shape[1])
    worst = 0.0
    for i in range(40):
        x = np.concatenate([w.features, w.features[i:i + 1]])
        for label in (0, 1):
            y = np.concatenate([w.labels, [label]])
            more = signals.client_statistics(model, x, y, 5, streams.model_input)
            worst = max(worst, float(np.linalg.norm(more - base)))
    assert worst <= bound + 1e-9
    assert worst > bound * 0.95  # the bound is nearly reached: it is not loose either


def _window_epsilon(spends: list, delta: float) -> float:
    """dp-accounting's PLD of a window's recorded events: the monitoring release a plain
    Gaussian, each DP-SGD step a Poisson-subsampled Gaussian."""
    events = []
    for sigma, rate, steps, purpose in spends:
        if purpose == accounting.MONITOR:
            assert rate == 1.0
            events.append(dp_accounting.SelfComposedDpEvent(
                dp_accounting.GaussianDpEvent(sigma), steps))
        else:
            events.append(dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)),
                steps))
    account = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    account.compose(dp_accounting.ComposedDpEvent(events))
    return account.get_epsilon(delta)


@pytest.fixture(scope="module")
def drift_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("drift") / "run"
    args = ["simulate", "--config", str(AGRAWAL), "--out", str(out)]
    for item in SMALL + ["drift.rounds-per-window=2", "rounds=10", "drift.drift-round=7"]:
        args += ["--set", item]
    proc = privet(*args)
    output = proc.communicate(timeout=600)[0]
    return out, proc.returncode, output


def test_a_drift_run_writes_its_results(drift_run):
    out, code, output = drift_run
    assert code == 0, output
    table = rows(out / "drift.csv")
    assert [int(r["round"]) for r in table] == list(range(1, 11))
    assert [int(r["window"]) for r in table] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert {"round", "window", "detected", "retrained", "accuracy"} <= set(table[0])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete"
    drift = summary["drift"]
    assert drift["true_drift_rounds"] == [7]
    assert set(drift) >= {"true_drift_rounds", "detections", "retrains", "detection_delay",
                          "false_alarms"}
    assert (out / "drift.png").stat().st_size > 0
    assert "drift mode" in output and "ε per window" in output


def test_each_window_stays_within_its_target_as_dp_accounting_computes_it(drift_run):
    """Every window's ledger (monitoring + the DP-SGD of the rounds that trained on it),
    recomputed with dp-accounting: within the target, and equal to what privet reports."""
    out, code, output = drift_run
    assert code == 0, output
    cfg = load_config(out / "config.toml")
    reported = json.loads((out / "summary.json").read_text())["privacy"]["epsilon_per_window"]
    found = {}
    for path in sorted((out / "ledgers" / "drift").glob("client-*/window-*.json")):
        window = int(path.stem.split("-")[1])
        (record,) = json.loads(path.read_text())
        purposes = [s[3] for s in record["spends"]]
        assert purposes[0] == accounting.MONITOR  # monitored before it trained
        eps = _window_epsilon(record["spends"], cfg.privacy.delta)
        assert eps <= cfg.privacy.epsilon * (1 + 5e-3)
        found[window] = max(found.get(window, 0.0), eps)
    assert sorted(found) == list(range(5))  # every window has its own ledger
    for window, eps in found.items():
        assert math.isclose(reported[str(window)], eps, rel_tol=5e-3)
    # windows trained on (rounds 1-3 = windows 0 and 1) spent more than monitored-only ones
    assert found[0] > 1.0 and found[1] > 1.0


def test_monitoring_that_alone_passes_the_target_is_refused():
    with pytest.raises(ConfigError, match="drift.monitor-noise"):
        accounting.check(small("drift.monitor-noise=0.5", "privacy.epsilon=1"))


def test_detection_delay_and_false_alarms():
    assert score([27, 28, 40], [25]) == (2, 1)
    assert score([10], [25]) == (None, 1)
    assert score([], [25]) == (None, 0)
    assert score([7], [], known=False) == (None, None)  # a file without drift.drift-round


def test_page_hinkley_fires_on_a_jump_of_the_error_rate_and_not_on_noise():
    cfg = small()
    monitor = DriftMonitor(cfg.drift)
    rng = np.random.default_rng(0)
    for r in range(1, 30):
        error = 0.05 + rng.normal(0, 0.02) + (0.4 if r >= 20 else 0.0)
        monitor.observe(r, r, {"error_rate": error})
    assert [e.round for e in monitor.events] == [20]


@pytest.mark.parametrize("name, expected", [
    ("never", [1, 2, 3]),
    ("periodic", [1, 2, 3, 7, 8, 11, 12]),  # every 4 windows after the warm-up's last
    ("on-drift", [1, 2, 3, 8, 9]),
])
def test_retraining_policies(name, expected):
    cfg = small(f"drift.policy={name}", "drift.period=4", "drift.retrain-rounds=2")
    policy = RetrainPolicy(cfg.drift, 1)
    trained = [r for r in range(1, 13)
               if policy.decide(r, r - 1, True, detected=(r == 8)).train]
    assert trained == expected


@pytest.mark.parametrize("setting, key", [
    ("privacy.level=user", "privacy.level"),
    ("strategy.name=krum", "strategy.name"),
    ("preprocess.fit=federated", "preprocess.fit"),
    ("drift.warmup-rounds=60", "drift.warmup-rounds"),
    ("drift.time-column=t", "drift.time-column"),
    ("privacy.ledger-dir=/tmp/x", "privacy.ledger-dir"),
    ("tracking.mlflow=./mlruns", "tracking.mlflow"),
    ("drift.rows-per-window=10", "drift.rows-per-window"),
])
def test_what_drift_mode_does_not_cover_is_refused_in_one_line(setting, key):
    with pytest.raises(ConfigError) as error:
        load_config(AGRAWAL, [setting])
    assert key in str(error.value) and "\n" not in str(error.value)


def test_drift_compare_measures_a_run(drift_run):
    from privet.experiments.drift_compare import measure

    out, code, output = drift_run
    assert code == 0, output
    row, curve = measure(out, "on-drift", 7)
    assert [c["round"] for c in curve] == list(range(1, 11))
    table = rows(out / "drift.csv")
    before = [float(r["accuracy"]) - float(r["majority"]) for r in table[1:6]]  # rounds 2-6
    assert math.isclose(row["gap_before"], sum(before) / 5, abs_tol=1e-4)


def test_one_row_in_every_window_composes_every_window(drift_run):
    """What one person with a row in each window of a client spent: all that client's
    window ledgers composed, recomputed with dp-accounting."""
    out, code, output = drift_run
    assert code == 0, output
    cfg = load_config(out / "config.toml")
    reported = json.loads((out / "summary.json").read_text())["privacy"][
        "epsilon_one_row_every_window"]
    worst = 0.0
    for client_dir in sorted((out / "ledgers" / "drift").glob("client-*")):
        spends = [s for path in sorted(client_dir.glob("window-*.json"))
                  for s in json.loads(path.read_text())[0]["spends"]]
        worst = max(worst, _window_epsilon(spends, cfg.privacy.delta))
    assert math.isclose(reported, worst, rel_tol=5e-3)
    assert worst > cfg.privacy.epsilon  # more than any one window: the README's point
    assert "one person with a row in every window" in output


@pytest.mark.parametrize("source, before, after", [("sea", 0, 3), ("hyperplane", 1, 2)])
def test_other_generators_switch_concept_at_the_drift(source, before, after):
    cfg = small(f"drift.source={source}", f"drift.concept-before={before}",
                f"drift.concept-after={after}")
    calm = small(f"drift.source={source}", f"drift.concept-before={before}",
                 "drift.drift-round=0")
    assert len(streams.feature_names(cfg)) == streams.window(cfg, 0, 0).features.shape[1]
    assert np.array_equal(streams.window(cfg, 0, 3).labels, streams.window(calm, 0, 3).labels)
    assert not np.array_equal(streams.window(cfg, 0, 5).labels,
                              streams.window(calm, 0, 5).labels)


def test_a_gradual_drift_mixes_the_concepts_over_its_width():
    """Per window, the share of rows (among those the two concepts disagree on) labelled as
    the new concept labels them: ~0 before the drift, rising over `width` windows (river's
    sigmoid), ~1 after."""
    cfg = small("rounds=12", "drift.drift-round=3", "drift.width=4",
                "drift.concept-before=0", "drift.concept-after=2")
    from river.datasets import synth

    def rule(function, window):  # river's labelling function applied to the window's rows
        w = streams.window(cfg, 0, window)
        lo, hi = zip(*streams.AGRAWAL_BOUNDS.values())
        raw = w.features * (np.array(hi) - np.array(lo)) + np.array(lo)
        gen = synth.Agrawal(classification_function=function)
        names = list(streams.AGRAWAL_BOUNDS)
        return np.array([gen._classification_functions[function](
            *[round(v) if k in ("age", "elevel", "car", "zipcode", "hyears") else v
              for k, v in zip(names, row)]) for row in raw])

    share = []
    for window in range(10):
        labels = streams.window(cfg, 0, window).labels
        share.append(float(np.mean((labels == rule(2, window)) & (labels != rule(0, window)))
                           / max(np.mean(rule(2, window) != rule(0, window)), 1e-9)))
    # (the rows are rebuilt from float32 features: a few land on the other side of a
    # salary threshold, hence not exactly 0 and 1)
    assert share[0] < 0.1 and share[1] < 0.1
    assert share[2] < share[4] < share[6]
    assert share[9] > 0.9



def test_pause_and_resume_are_refused_in_one_line(drift_run, tmp_path):
    out, code, output = drift_run
    paused = privet("simulate", "--config", str(AGRAWAL), "--pause-after", "2", "--out",
                    str(tmp_path / "p"))
    text = paused.communicate(timeout=120)[0]
    assert paused.returncode != 0 and "drift mode cannot pause" in text, text
    resumed = privet("simulate", "--resume", str(out))
    text = resumed.communicate(timeout=120)[0]
    assert resumed.returncode != 0 and "cannot be resumed yet" in text, text


def test_the_summary_counts_what_the_ledgers_hold(tmp_path):
    """A round stopped in flight was paid before it ran: the summary's ε per window comes
    from the window ledgers, recomputed here with dp-accounting."""
    from privet.clients.drift import ledger_path
    from privet.server.drift import DriftRecorder

    cfg = small()
    spends = [[8.0, 1.0, 1, accounting.MONITOR], [1.1, 0.1, 30, "dp-sgd"]]
    path = Path(ledger_path(str(tmp_path), 1, 3))
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps([{"id": "r-client1-window3", "run": "r", "client": "1",
                                 "source": "x", "rows": "", "noise_source": "seeded",
                                 "spends": spends}]))
    recorder = DriftRecorder(tmp_path, cfg, "r")
    recorder.read_ledgers()
    expected = _window_epsilon(spends, cfg.privacy.delta)
    assert math.isclose(recorder.window_epsilon[3], expected, rel_tol=5e-3)
    assert math.isclose(recorder.across_windows, expected, rel_tol=5e-3)


def test_a_report_refuses_to_average_different_scenarios(tmp_path):
    from privet.experiments.drift_compare import scenario_differences

    for name, sets in (("a", ["drift.policy=never"]), ("b", ["drift.policy=on-drift"]),
                       ("c", ["drift.drift-round=6"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.toml").write_text(small(*sets).to_toml())
    assert scenario_differences([tmp_path / "a", tmp_path / "b"]) == []
    assert scenario_differences([tmp_path / "a", tmp_path / "c"]) == ["drift.drift-round: 5, 6"]
