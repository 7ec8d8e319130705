"""User-level planning (`privet budget --users --cohort`): against dp-accounting called
directly (tests/independent.py), against what a user-level run reports, and its errors."""

import json

import numpy as np
import pytest
from dp_accounting.pld import privacy_loss_distribution
from independent import pld_epsilon
from typer.testing import CliRunner

from privet.common.config import CONFIGS_DIR
from privet.common.privacy import pld_plan
from privet.experiments.budget import (UserPlan, epsilon_over_rounds, report_rounds,
                                      sigma_for_targets)
from privet.experiments.cli import app

DELTA = 1e-5
SMALL = UserPlan(users=10_000, cohort=100, rounds=500, delta=DELTA)  # seconds, not minutes


def _pmf_arrays(pmf):
    """(lower loss, probabilities, infinity mass) of a dense or sparse dp-accounting PMF."""
    if hasattr(pmf, "_probs"):
        return pmf._lower_loss, np.asarray(pmf._probs), pmf._infinity_mass
    losses = sorted(pmf._loss_probs)
    dense = np.zeros(losses[-1] - losses[0] + 1)
    for loss, prob in pmf._loss_probs.items():
        dense[loss - losses[0]] = prob
    return losses[0], dense, pmf._infinity_mass


@pytest.mark.parametrize("sigma, q, grid", [(1.0, 1e-3, 1e-4), (0.6, 0.3, 1e-3),
                                            (1.5, 1.0, 1e-4), (0.8, 0.05, 1e-4),
                                            (20.0, 1e-3, 1e-4)])
def test_one_step_pld_is_dp_accountings(sigma, q, grid):
    """The vectorised one-step PLD has dp-accounting's PMFs (its lossy Python-loop build)."""
    ours = pld_plan.subsampled_gaussian_pld(sigma, q, grid)
    theirs = privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=grid)
    for side in ("_pmf_remove", "_pmf_add"):
        (lo_a, p_a, inf_a), (lo_b, p_b, inf_b) = (_pmf_arrays(getattr(pld, side))
                                                  for pld in (ours, theirs))
        assert lo_a == lo_b and p_a.shape == p_b.shape
        np.testing.assert_allclose(p_a, p_b, rtol=1e-9, atol=1e-18)
        assert inf_a == pytest.approx(inf_b, rel=1e-9, abs=1e-30)


@pytest.mark.parametrize("sigma", [0.7, 1.0])
def test_epsilon_over_rounds_is_dp_accountings_pld(sigma):
    """10^4 users, 100 a round, 500 rounds: every tabulated round within 1% of
    PLDAccountant(PoissonSampledDpEvent(q, Gaussian(σ)) × r) at dp-accounting's default
    discretisation (in practice to ~1e-9)."""
    curve = epsilon_over_rounds(SMALL, sigma, ["pld"])["pld"]
    assert [r for r, _ in curve] == report_rounds(SMALL.rounds)
    for r, eps in curve[4::8] + curve[-1:]:
        assert eps == pytest.approx(pld_epsilon([(sigma, 0.01, r)], DELTA), rel=0.01)
    assert all(a[1] < b[1] for a, b in zip(curve, curve[1:]))


def test_sigma_for_targets_meets_each_target_within_one_percent():
    """dp-accounting's ε at the planned σ is ≤ the target and within 1% of it; 0.2% less
    noise passes the target (the σ is the smallest, to the 1e-3 tolerance)."""
    table = sigma_for_targets(SMALL, [0.5, 1.0, 4.0], ["pld"])["pld"]
    for target, sigma in table:
        spent = pld_epsilon([(sigma, SMALL.sample_rate, SMALL.rounds)], DELTA)
        assert target * 0.99 <= spent <= target * (1 + 1e-9)
        assert pld_epsilon([(sigma * 0.998, SMALL.sample_rate, SMALL.rounds)], DELTA) > target


def test_user_plan_columns_of_other_accountants_compose_the_same_releases():
    """RDP and PRV plan (σ, q, 1) a round, the user-level ledger's record."""
    plan = UserPlan(users=100, cohort=10, rounds=10, delta=DELTA)
    curves = epsilon_over_rounds(plan, 1.0, ["pld", "rdp"])
    assert curves["pld"][-1][1] < curves["rdp"][-1][1]  # RDP is the looser bound
    assert curves["pld"][-1][1] == pytest.approx(pld_epsilon([(1.0, 0.1, 10)], DELTA),
                                                 rel=0.01)


@pytest.mark.slow
def test_cross_device_plan_is_dp_accountings_pld():
    """The issue's scale: 10^6 users, 10^3 a round, 10^4 rounds (the time is measured in
    experiments/bench_budget.py, not here)."""
    plan = UserPlan(users=1_000_000, cohort=1000, rounds=10_000, delta=DELTA)
    (_, eps), = epsilon_over_rounds(plan, 1.0, ["pld"])["pld"][-1:]
    assert eps == pytest.approx(pld_epsilon([(1.0, 1e-3, 10_000)], DELTA), rel=0.01)
    for target, sigma in sigma_for_targets(plan, [1.0, 8.0], ["pld"])["pld"]:
        spent = pld_epsilon([(sigma, 1e-3, 10_000)], DELTA)
        assert target * 0.99 <= spent <= target * (1 + 1e-9)


def test_plan_matches_a_user_level_run(tmp_path):
    """A tiny privacy.level = "user" run: its ledger holds (σ, q, rounds) and nothing else,
    the plan's σ for its target is the run's (both calibrate to 1e-3), and the plan's ε at
    the run's σ is the ε the run reports."""
    from test_simulation import privet

    out = tmp_path / "run"
    proc = privet("simulate", "--config", str(CONFIGS_DIR / "tiny.toml"),
                  "--set", "privacy.level=user", "--set", "num-clients=4",
                  "--set", "clients-per-round=2", "--set", "rounds=3",
                  "--set", "privacy.user-epsilon=2", "--out", str(out))
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    user = json.loads((out / "summary.json").read_text())["privacy"]["user_level"]
    (sigma, rate, rounds), = user["history"]
    plan = UserPlan(users=4, cohort=2, rounds=3, delta=user["delta"])
    assert (rate, rounds) == (plan.sample_rate, plan.rounds)
    (_, planned), = sigma_for_targets(plan, [user["target_epsilon"]], ["pld"])["pld"]
    assert planned == pytest.approx(sigma, rel=3e-3)
    (_, eps), = epsilon_over_rounds(plan, sigma, ["pld"])["pld"][-1:]
    assert eps == pytest.approx(user["epsilon"], rel=0.01)


def test_a_target_only_tiny_noise_reaches_is_an_error_not_gigabytes():
    with pytest.raises(ValueError, match="too little to account for"):
        pld_plan.calibrate(5000.0, DELTA, 1.0, 1)


def _budget(*args):
    return CliRunner().invoke(app, ["budget", *args], catch_exceptions=False)


def test_budget_command_at_user_level(tmp_path):
    png = tmp_path / "plan.png"
    done = _budget("--users", "10000", "--cohort", "100", "--rounds", "40", "--sigma", "1",
                   "--accountant", "pld", "--out", str(png))
    assert done.exit_code == 0, done.output
    assert "user level" in done.output and "q = 100/10,000 = 0.01" in done.output
    assert "ε pld" in done.output and "ε rdp" not in done.output
    assert "left out: prv, rdp" in done.output
    assert png.stat().st_size > 1000
    last = [line for line in done.output.splitlines() if line.strip("│ ").startswith("40 ")]
    assert float(last[0].split("│")[2]) == pytest.approx(
        pld_epsilon([(1.0, 0.01, 40)], DELTA), abs=1e-4)
    targets = _budget("--users", "10000", "--cohort", "100", "--rounds", "40",
                      "--epsilon", "1,2", "--accountant", "pld,rdp", "--out", str(png))
    assert targets.exit_code == 0, targets.output
    assert "σ pld" in targets.output and "σ rdp" in targets.output
    assert "40 rounds" in targets.output and "left out: prv" in targets.output


@pytest.mark.parametrize("args, says", [
    (["--users", "100"], "needs both --users and --cohort"),
    (["--cohort", "10"], "needs both --users and --cohort"),
    (["--users", "10", "--cohort", "20"], "--cohort 20: more than --users 10"),
    (["--users", "100", "--cohort", "10", "--rows", "1000"], "--rows: sample-level options"),
    (["--users", "100", "--cohort", "10", "--preprocess-epsilon", "0.3"],
     "--preprocess-epsilon: sample-level options"),
    (["--users", "100", "--cohort", "10", "--accountant", "gdp"], "--accountant 'gdp'"),
    (["--steps-per-round", "5", "--sample-rate", "0.1", "--batch-size", "32"],
     "--batch-size and --local-epochs go with --rows"),
    (["--users", "100", "--cohort", "10", "--epsilon", "1", "--sigma", "1"],
     "exactly one of --sigma"),
    (["--users", "1000", "--cohort", "10", "--sigma", "0.01"], "too little noise"),
])
def test_bad_combinations_are_one_line(args, says, tmp_path):
    if "--sigma" not in args and "--epsilon" not in args:
        args = [*args, "--sigma", "1"]
    done = CliRunner().invoke(app, ["budget", *args, "--out", str(tmp_path / "p.png")])
    assert done.exit_code == 2
    errors = [line for line in done.output.splitlines() if "privet: error" in line]
    assert len(errors) == 1 and says in done.output.replace("\n", " "), done.output
    assert not (tmp_path / "p.png").exists()
    assert "Traceback" not in done.output
