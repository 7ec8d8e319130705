"""User-level DP: server-side clipping and noise, Poisson client sampling, accounting."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from independent import pld_epsilon, rdp_epsilon
from test_simulation import privet, rows
from test_strategy import ConnectedNodes

from privet.common.config import CONFIGS_DIR
from privet.common.privacy.accountants import calibrate_noise
from privet.common.privacy.randomness import Randomness, SecureRandomness, SeededRandomness
from privet.server.user_dp import UserLevelDPFedAvg, centred_unclipped_count, clipped_noisy_mean


def _state(*values):
    return {"w": torch.tensor(values, dtype=torch.float32), "steps": torch.tensor(7)}


def test_updates_are_clipped_summed_and_divided_by_the_expected_cohort():
    global_state = _state(0.0, 0.0)
    clients = [_state(3.0, 4.0), _state(0.3, 0.4)]  # update norms 5 and 0.5
    new, norms = clipped_noisy_mean(global_state, clients, clip=1.0, noise_multiplier=0.0,
                                    expected_clients=4.0, randomness=SeededRandomness(0))
    assert norms == pytest.approx([5.0, 0.5])
    # (clip(3,4) + (0.3,0.4)) / 4 = ((0.6,0.8) + (0.3,0.4)) / 4
    assert torch.allclose(new["w"], torch.tensor([0.225, 0.3]))
    assert int(new["steps"]) == 7  # non-float entries are left alone


def test_noise_standard_deviation_is_sigma_times_clip_over_expected_cohort():
    global_state = {"w": torch.zeros(20_000)}
    new, _ = clipped_noisy_mean(global_state, [], clip=0.5, noise_multiplier=2.0,
                                expected_clients=5.0, randomness=SeededRandomness(0))
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
    from privet.server.user_dp import adaptive_noise, effective_noise

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


# --- adaptive clipping: the count query's sensitivity, probed through the real path ------
#
# The audit's example (shared/cases/privacy/adaptive_clip_count_sensitivity): 20 clients,
# p = 0.25, 3 rounds, σ_b = 0.6, user ε = 3 at δ = 1e-5, S = 1.
S, N, P, T, COUNT_STDDEV, TARGET, DELTA = 1.0, 20, 0.25, 3, 0.6, 3.0, 1e-5


class NoNoise(Randomness):
    """The noise-free query, for sensitivity probes: every uniform draw is 0 (so every node
    is sampled) and every Gaussian draw is 0."""

    kind = "none"

    def poisson_masks(self, steps, rows, rate):
        return torch.ones(steps, rows, dtype=torch.bool)

    def gaussian(self, shape, std, dtype=torch.float32):
        return torch.zeros(tuple(shape), dtype=dtype)

    def gaussian_numpy(self, shape, std):
        return np.zeros(shape)

    def uniform(self, size):
        return np.zeros(size)


class FixedUniforms(NoNoise):
    """Uniform draws given in advance (one batch per call)."""

    def __init__(self, draws):
        self.draws = [np.asarray(d, dtype=np.float64) for d in draws]

    def uniform(self, size):
        draws = self.draws.pop(0)
        assert len(draws) == size
        return draws


@pytest.fixture
def task_identity():
    """Flower stamps messages with the run, task and node they come from."""
    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


def audit_strategy(randomness, noise_multiplier=None, **overrides):
    settings = dict(noise_multiplier=noise_multiplier or calibrate_noise(TARGET, DELTA, P, T),
                    clip=S, sample_rate=P, num_clients=N, seed=0, adaptive=True,
                    target_quantile=0.5, clip_lr=0.2, count_stddev=COUNT_STDDEV,
                    randomness=randomness)
    settings.update(overrides)
    return UserLevelDPFedAvg(**settings)


def play_round(strategy, server_round, global_w, nodes, update):
    """configure_train on `nodes`, a reply from every sampled node with global + update(node),
    aggregate_train: the strategy's real path. Returns (new w, sampled nodes)."""
    sent = list(strategy.configure_train(server_round, ArrayRecord({"w": global_w}),
                                         ConfigRecord({}), ConnectedNodes(nodes)))
    replies = [Message(RecordDict({
        "arrays": ArrayRecord({"w": global_w + update(m.metadata.dst_node_id)}),
        "metrics": MetricRecord({"client-id": m.metadata.dst_node_id, "num-examples": 1})}),
        reply_to=m) for m in sent]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return arrays.to_torch_state_dict()["w"], [m.metadata.dst_node_id for m in sent]


def released_count(updates):
    """The count the server releases for a cohort whose updates are `updates` (one per
    client), noise-free; checked against the clip update it drives."""
    strategy = audit_strategy(NoNoise())
    _, sampled = play_round(strategy, 1, torch.zeros(4), list(range(1, len(updates) + 1)),
                            lambda node: updates[node - 1])
    assert len(sampled) == len(updates)  # NoNoise samples everyone
    (count,) = strategy.released_counts
    # the clip moved by exp(-η (count / E[m] + ½ - γ)): read the count back from it
    fraction = strategy.target_quantile - math.log(strategy.clip / S) / strategy.clip_lr
    # E[m]: the cohort expected of the nodes that could be sampled (p × connected, not left out)
    assert (fraction - 0.5) * strategy.round_expected == pytest.approx(count, abs=1e-9)
    return count


def measured_count_sensitivity():
    """max |count(cohort + one) − count(cohort)| over one extra client inside the clip
    (norm exactly S) and one outside it."""
    cohort = [torch.tensor([2.0, 0, 0, 0]), torch.tensor([0.3, 0, 0, 0])]
    inside, outside = torch.tensor([0.0, S, 0, 0]), torch.tensor([0.0, 0, 1.5, 0])
    base = released_count(cohort)
    shifts = [released_count(cohort + [inside]) - base, released_count(cohort + [outside]) - base]
    assert shifts == [0.5, -0.5]  # exactly ½ in magnitude, in the direction of the bit
    return max(abs(shift) for shift in shifts)


def test_one_more_participant_moves_the_released_count_by_at_most_a_half(task_identity):
    assert measured_count_sensitivity() == 0.5 == audit_strategy(NoNoise()).count_sensitivity
    assert released_count([]) == 0.0  # no update: the centred count is 0, the fraction ½
    # the pure query agrees with what the strategy released
    assert centred_unclipped_count([2.0, 0.3, S], S) == 0.5


def test_ledger_epsilon_is_the_joint_mechanism_for_the_measured_sensitivity(task_identity):
    sigma = calibrate_noise(TARGET, DELTA, P, T)
    strategy = audit_strategy(SeededRandomness(0), sigma)
    # σ_eff from the strategy's model noise, σ_b and the sensitivity measured above
    z, count_stddev = strategy.model_noise, strategy.count_stddev
    sensitivity = measured_count_sensitivity()
    sigma_eff = (z ** -2 + (count_stddev / sensitivity) ** -2) ** -0.5
    independent = pld_epsilon([(sigma_eff, P, T)], DELTA)
    w = torch.zeros(4)
    for server_round in range(1, T + 1):
        w, _ = play_round(strategy, server_round, w, list(range(1, N + 1)),
                          lambda node: torch.full((4,), 0.1 * node))
    assert strategy.ledger.history == [(pytest.approx(sigma_eff, rel=1e-9), P, T)]
    assert strategy.ledger.epsilon(DELTA, "pld") == pytest.approx(independent, rel=1e-2)
    assert independent <= TARGET


def test_poisson_sampling_draws_one_uniform_per_node_in_id_order(task_identity):
    strategy = audit_strategy(FixedUniforms([[0.9, 0.1, 0.3, 0.2499]]))
    _, sampled = play_round(strategy, 1, torch.zeros(2), [40, 10, 30, 20],
                            lambda node: torch.zeros(2))
    assert sorted(sampled) == [20, 40]  # nodes sorted 10, 20, 30, 40: draws < 0.25 at 20, 40


def _two_runs(make_randomness):
    """The same replies aggregated by two strategies (every node sampled: p = 1)."""
    results = []
    for _ in range(2):
        strategy = audit_strategy(make_randomness(), noise_multiplier=1.0, sample_rate=1.0,
                                  num_clients=4, count_stddev=2.0)
        w, sampled = play_round(strategy, 1, torch.zeros(8), [1, 2, 3, 4],
                                lambda node: torch.full((8,), 0.2 * node))
        assert sampled == [1, 2, 3, 4]
        results.append((w, strategy.clip))
    return results


def test_secure_randomness_gives_different_models_seeded_the_same(task_identity):
    (w1, clip1), (w2, clip2) = _two_runs(SecureRandomness)
    assert not torch.equal(w1, w2) and clip1 != clip2
    (w1, clip1), (w2, clip2) = _two_runs(lambda: SeededRandomness(7))
    assert torch.equal(w1, w2) and clip1 == clip2


def test_without_randomness_the_seed_is_used():
    strategy = UserLevelDPFedAvg(noise_multiplier=1.0, clip=1.0, sample_rate=0.5,
                                 num_clients=4, seed=3)
    assert isinstance(strategy.randomness, SeededRandomness)
