"""User-level DP: server-side clipping and noise, Poisson client sampling, accounting."""

import json

import pytest
import torch
from independent import pld_epsilon, rdp_epsilon
from test_simulation import privet, rows

from common.config import CONFIGS_DIR
from server.user_dp import clipped_noisy_mean


def _state(*values):
    return {"w": torch.tensor(values, dtype=torch.float32), "steps": torch.tensor(7)}


def test_updates_are_clipped_summed_and_divided_by_the_expected_cohort():
    global_state = _state(0.0, 0.0)
    clients = [_state(3.0, 4.0), _state(0.3, 0.4)]  # update norms 5 and 0.5
    new, norms = clipped_noisy_mean(global_state, clients, clip=1.0, noise_multiplier=0.0,
                                    expected_clients=4.0, generator=torch.Generator())
    assert norms == pytest.approx([5.0, 0.5])
    # (clip(3,4) + (0.3,0.4)) / 4 = ((0.6,0.8) + (0.3,0.4)) / 4
    assert torch.allclose(new["w"], torch.tensor([0.225, 0.3]))
    assert int(new["steps"]) == 7  # non-float entries are left alone


def test_noise_standard_deviation_is_sigma_times_clip_over_expected_cohort():
    global_state = {"w": torch.zeros(20_000)}
    new, _ = clipped_noisy_mean(global_state, [], clip=0.5, noise_multiplier=2.0,
                                expected_clients=5.0,
                                generator=torch.Generator().manual_seed(0))
    # 20,000 draws: relative standard error of the std ≈ 0.5%
    assert float(new["w"].std()) == pytest.approx(2.0 * 0.5 / 5.0, rel=0.03)


@pytest.fixture(scope="module")
def both_levels_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("both") / "run"
    proc = privet("simulate", "--config", str(CONFIGS_DIR / "tiny.toml"),
                  "--set", "privacy.level=both", "--set", "num-clients=4",
                  "--set", "clients-per-round=2", "--set", "rounds=3",
                  "--set", "privacy.user-epsilon=2", "--set", "privacy.accountant=rdp",
                  "--out", str(out))
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    return out, stdout


def test_user_level_epsilon_includes_sampling_amplification(both_levels_run):
    out, stdout = both_levels_run
    summary = json.loads((out / "summary.json").read_text())
    user = summary["privacy"]["user_level"]
    (sigma, rate, rounds), = user["history"]
    assert rate == 0.5 and rounds == 3
    # this run uses the RDP accountant: check it against dp-accounting's RDP, and that it
    # is an upper bound of the tight PLD value
    assert user["epsilon"] == pytest.approx(rdp_epsilon(user["history"], user["delta"]),
                                            rel=0.01)
    assert user["epsilon"] >= pld_epsilon(user["history"], user["delta"])
    assert user["epsilon"] <= user["target_epsilon"] == 2
    # without amplification (what Flower 1.41's accountant assumes) ε would be far larger
    assert pld_epsilon([(sigma, 1.0, rounds)], user["delta"]) > 1.5 * user["epsilon"]
    per_round = [float(r["user_epsilon"]) for r in rows(out / "rounds.csv")]
    assert all(a < b for a, b in zip(per_round, per_round[1:]))
    assert "user ε" in stdout


def test_both_levels_are_reported_separately(both_levels_run):
    out, _ = both_levels_run
    summary = json.loads((out / "summary.json").read_text())
    privacy = summary["privacy"]
    assert privacy["level"] == "both"
    assert 0 < privacy["max_epsilon"] <= privacy["target_epsilon"]
    assert privacy["accountant"] == "rdp"
    for client in privacy["clients"].values():
        assert client["epsilon"] == pytest.approx(
            rdp_epsilon(client["history"], privacy["delta"]), rel=0.01)
        assert client["epsilon"] <= client["target_epsilon"]
    # Poisson sampling: the cohort varies, so rounds trained differ between clients
    trained = [c["rounds_trained"] for c in privacy["clients"].values()]
    assert sum(trained) == sum(int(r["clients_trained"]) for r in rows(out / "rounds.csv"))


def test_adaptive_noise_splits_the_calibrated_multiplier_between_two_queries():
    from server.user_dp import adaptive_noise, effective_noise

    count_stddev, model_noise = adaptive_noise(1.5, expected_clients=40, count_stddev=None)
    assert count_stddev == 2.0  # Flower's default: expected cohort / 20
    assert model_noise > 1.5  # the model query gets more noise than the target multiplier
    # independent arithmetic: Gaussian queries compose as 1/z² = Σ 1/z_i²
    assert 1 / model_noise ** 2 + 1 / (2 * count_stddev) ** 2 == pytest.approx(1 / 1.5 ** 2)
    assert effective_noise(model_noise, count_stddev) == pytest.approx(1.5)
    with pytest.raises(ValueError):
        adaptive_noise(1.5, expected_clients=2, count_stddev=None)  # σ_b = 0.1 too small


def test_adaptive_clipping_run_accounts_for_the_count_query(tmp_path):
    out = tmp_path / "run"
    proc = privet("simulate", "--config", str(CONFIGS_DIR / "tiny.toml"),
                  "--set", "privacy.level=user", "--set", "privacy.user-clipping=adaptive",
                  "--set", "privacy.user-count-stddev=2", "--set", "num-clients=4",
                  "--set", "clients-per-round=2", "--set", "rounds=3", "--out", str(out))
    stdout, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, stdout
    user = json.loads((out / "summary.json").read_text())["privacy"]["user_level"]
    (sigma, rate, rounds), = user["history"]
    assert (rate, rounds, user["clipping"], user["count_stddev"]) == (0.5, 3, "adaptive", 2.0)
    assert 1 / sigma ** 2 == pytest.approx(1 / user["model_noise_multiplier"] ** 2 + 1 / 4 ** 2)
    reference = pld_epsilon(user["history"], user["delta"])
    assert reference * (1 - 1e-9) <= user["epsilon"] <= min(reference * 1.01, 3.0)
    clips = user["clip_per_round"]
    assert len(clips) == 3 and clips[0] == 1.0 and len(set(clips)) > 1
