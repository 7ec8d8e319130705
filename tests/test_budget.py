import subprocess
import sys

import pytest
from conftest import PROJECT_DIR
from independent import pld_epsilon

from privet.common.privacy import accountants
from privet.experiments.budget import Plan, epsilon_over_rounds, report_rounds, sigma_for_targets


def test_plan_uses_opacus_poisson_rate_and_steps():
    plan = Plan.from_rows(rows=3256, batch_size=64, local_epochs=2, rounds=10, delta=1e-5)
    assert plan.sample_rate == 1 / 51 and plan.steps_per_round == 102 and plan.steps == 1020


def test_report_rounds_always_ends_at_the_last_round():
    assert report_rounds(5) == [1, 2, 3, 4, 5]
    picked = report_rounds(101)
    assert len(picked) <= 21 and picked[-1] == 101


@pytest.mark.parametrize("target", [0.5, 8.0])
def test_sigma_for_extreme_targets_is_fast_and_meets_them(target):
    """Large targets need small σ, where PLD grids explode if probed carelessly."""
    plan = Plan(rounds=20, steps_per_round=51, sample_rate=1 / 51, delta=1e-5)
    (_, sigma), = sigma_for_targets(plan, [target], accountants=("pld",))["pld"]
    assert pld_epsilon([(sigma, plan.sample_rate, plan.steps)], plan.delta) <= target * 1.01
    assert accountants.epsilon([(sigma * 0.995, plan.sample_rate, plan.steps)], plan.delta,
                               "pld") > target


def test_epsilon_curve_grows_and_orders_accountants():
    plan = Plan(rounds=5, steps_per_round=50, sample_rate=0.02, delta=1e-5)
    curves = epsilon_over_rounds(plan, sigma=1.0)
    for points in curves.values():
        assert [r for r, _ in points] == [1, 2, 3, 4, 5]
        assert all(a[1] < b[1] for a, b in zip(points, points[1:]))
    assert curves["pld"][-1][1] < curves["rdp"][-1][1]  # RDP is the looser bound


def test_budget_command(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "privet.experiments.cli", "budget", "--rows", "1000",
         "--rounds", "3", "--epsilon", "1,4", "--out", str(tmp_path / "plan.png")],
        cwd=PROJECT_DIR, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "σ pld" in done.stdout and "σ rdp" in done.stdout and "σ prv" in done.stdout
    assert (tmp_path / "plan.png").stat().st_size > 1000
    bad = subprocess.run([sys.executable, "-m", "privet.experiments.cli", "budget", "--rows", "10",
                          "--epsilon", "1", "--sigma", "1"], cwd=PROJECT_DIR,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "exactly one of --sigma" in bad.stderr


def test_a_plan_with_preprocessing_gives_the_sigma_a_run_needs_after_it():
    """privet simulate spends preprocess.epsilon before DP-SGD: planned with it, σ and the
    release compose to the target (dp-accounting, directly); without it, they pass it."""
    from privet.experiments.budget import release_at

    prior = release_at(0.3, 1e-5)
    plan = Plan.from_rows(3256, 64, 1, 20, 1e-5, prior)
    (target, sigma), = sigma_for_targets(plan, [1.0], ["pld"])["pld"]
    history = [*prior, (sigma, plan.sample_rate, plan.steps)]
    assert pld_epsilon(history, 1e-5) == pytest.approx(1.0, rel=0.01)
    assert pld_epsilon(history, 1e-5) <= 1.0 * 1.001
    alone = sigma_for_targets(Plan.from_rows(3256, 64, 1, 20, 1e-5), [1.0], ["pld"])["pld"]
    assert pld_epsilon([*prior, (alone[0][1], plan.sample_rate, plan.steps)], 1e-5) > 1.03


def test_budget_never_writes_over_a_file_it_did_not_write(tmp_path):
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a user's picture")
    args = [sys.executable, "-m", "privet.experiments.cli", "budget", "--rows", "1000", "--rounds",
            "2", "--sigma", "1", "--out"]
    refused = subprocess.run(args + [str(mine)], cwd=PROJECT_DIR, capture_output=True,
                             text=True, timeout=300)
    assert refused.returncode == 2 and "not written by privet budget" in refused.stderr
    assert mine.read_bytes() == b"a user's picture"
    plot = tmp_path / "plan.png"
    for _ in range(2):  # its own plot it replaces
        done = subprocess.run(args + [str(plot)], cwd=PROJECT_DIR, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
