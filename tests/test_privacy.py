import numpy as np
import pytest
from independent import pld_epsilon, rdp_epsilon

from privet.common.privacy import accountants
from privet.common.privacy.ledger import ALL_ROWS, MemoryStore, PrivacyLedger, SpendRecord

DELTA = 1e-5
HISTORIES = [
    [(1.0, 0.02, 1000)],
    [(0.8, 0.01, 300), (1.2, 0.05, 200)],
    [(0.7279, 1 / 149, 2980)],  # a default-experiment client
]


@pytest.mark.parametrize("history", HISTORIES)
def test_pld_is_an_upper_bound_within_one_percent_of_dp_accounting(history):
    reference = pld_epsilon(history, DELTA)
    ours = accountants.epsilon(history, DELTA, "pld")
    assert reference * (1 - 1e-9) <= ours <= reference * 1.01


@pytest.mark.parametrize("history", HISTORIES)
def test_pld_is_dp_accountings_pld_accountant_at_the_same_grid(history):
    """The per-process reuse of each (σ, q)'s one-step PLD changes nothing: asked twice (the
    second time from the cache), ε is what PLDAccountant composes from scratch."""
    reference = pld_epsilon(history, 1e-5, accountants.PLD_DISCRETISATION)
    for _ in range(2):
        accountants._epsilon_cached.cache_clear()
        assert accountants.epsilon(history, 1e-5, "pld") == pytest.approx(reference, rel=1e-9)


@pytest.mark.parametrize("sigma, q", [(1.14, 1 / 51), (0.73, 1 / 149), (3.0, 0.2), (0.9, 1.0)])
def test_remembered_convolution_bounds_are_dp_accountings(sigma, q):
    """privet's memo of the Chernoff bounds gives dp-accounting's own numbers, exactly."""
    from dp_accounting.pld import common, privacy_loss_distribution

    from privet.patches import dp_accounting as patched

    assert common.compute_self_convolve_bounds is patched.compute_self_convolve_bounds
    pld = privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=accountants.PLD_DISCRETISATION)
    for pmf in (pld._pmf_remove, pld._pmf_add):
        for steps in (1, 7, 51, 1000, 2980):
            for _ in range(2):  # computed, then remembered
                assert patched.compute_self_convolve_bounds(pmf._probs, steps, 1e-15) == \
                    patched._original(pmf._probs, steps, 1e-15)


@pytest.mark.parametrize("sigma, q", [(1.14, 1 / 51), (0.73, 1 / 149), (3.0, 0.2), (0.9, 1.0),
                                      (0.6, 0.01)])
def test_vectorised_epsilon_for_delta_is_dp_accountings(sigma, q):
    """privet's cumulative-sum search gives what dp-accounting's point-by-point loop gives."""
    import itertools

    from dp_accounting.pld import pld_pmf, privacy_loss_distribution

    from privet.patches import dp_accounting as patched

    assert pld_pmf._get_epsilon_for_delta is patched.epsilon_for_delta
    base = privacy_loss_distribution.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=accountants.PLD_DISCRETISATION)
    for steps in (1, 10, 300, 3000):
        pld = base.self_compose(steps)
        for pmf in (pld._pmf_remove, pld._pmf_add):
            top = (pmf._lower_loss + len(pmf._probs) - 1) * pmf._discretization
            for delta in (1e-8, 1e-5, 1e-3, 0.5):
                args = [pmf._infinity_mass, pmf._probs[::-1], delta]
                ours = patched.epsilon_for_delta(
                    args[0], itertools.count(top, -pmf._discretization), *args[1:])
                theirs = patched._original_epsilon(
                    args[0], itertools.count(top, -pmf._discretization), *args[1:])
                assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-15), (steps, delta)


@pytest.mark.parametrize("pessimistic", [True, False])
def test_vectorised_tail_truncation_is_dp_accountings(pessimistic):
    """privet's cumulative-sum tail truncation cuts where dp-accounting's loop cuts, with the
    same masses: on real composed PMFs and on random ones, at several truncation masses."""
    from dp_accounting.pld import pld_pmf, privacy_loss_distribution

    from privet.patches import dp_accounting as patched

    assert pld_pmf._truncate_tails is patched.truncate_tails
    rng = np.random.default_rng(0)
    arrays = [rng.dirichlet(np.full(n, alpha)) for n, alpha in ((5, 1.0), (500, 0.1),
                                                                 (5000, 2.0))]
    for sigma, q, steps in ((0.93, 1 / 51, 200), (11.2, 1.0, 1), (0.7, 0.2, 30)):
        pld = privacy_loss_distribution.from_gaussian_mechanism(
            sigma, sampling_prob=q, value_discretization_interval=1e-3).self_compose(steps)
        arrays.append(np.asarray(pld._pmf_remove._probs))
    for probs in arrays:
        for mass in (0.0, 1e-15, 1e-6, 0.3, 0.9):
            ours = patched.truncate_tails(probs.copy(), mass, pessimistic)
            theirs = patched._original_truncate(probs.copy(), mass, pessimistic)
            assert ours[0] == theirs[0] and ours[2] == theirs[2]
            assert np.array_equal(ours[1], theirs[1])


@pytest.mark.parametrize("history, kept", [(((0.93, 1 / 37, 370),), 1),
                                           (((5.0, 1 / 200, 400),), 0)])  # a sparse PMF
def test_one_step_plds_kept_on_disk_give_the_same_epsilon(tmp_path, monkeypatch, history, kept):
    """What another worker (or a later run) loads from the cache is what was built; PLDs
    dp-accounting keeps sparse are not written."""
    monkeypatch.setenv("PRIVET_CACHE_DIR", str(tmp_path))
    built = accountants._pld_epsilon(history, DELTA)  # in memory only
    accountants._subsampled_gaussian.cache_clear()
    written = accountants._pld_epsilon(history, DELTA, on_disk=True)
    assert len(list((tmp_path / "pld").glob("*.npz"))) == kept
    accountants._subsampled_gaussian.cache_clear()
    from privet.patches import dp_accounting as patched

    patched._kept.clear()
    loaded = accountants._pld_epsilon(history, DELTA, on_disk=True)
    assert built == written == loaded


@pytest.mark.parametrize("history", HISTORIES)
def test_rdp_matches_dp_accounting_rdp(history):
    assert accountants.epsilon(history, DELTA, "rdp") == pytest.approx(
        rdp_epsilon(history, DELTA), rel=0.01)


@pytest.mark.parametrize("history", HISTORIES)
def test_prv_agrees_with_pld_reference(history):
    assert accountants.epsilon(history, DELTA, "prv") == pytest.approx(
        pld_epsilon(history, DELTA), rel=0.02)


@pytest.mark.parametrize("accountant", accountants.ACCOUNTANTS)
def test_calibrated_noise_meets_the_target_tightly(accountant):
    q, steps, target = 1 / 50, 1000, 3.0
    sigma = accountants.calibrate_noise(target, DELTA, q, steps, accountant)
    assert accountants.epsilon([(sigma, q, steps)], DELTA, accountant) <= target
    # not wastefully noisy: 0.3% less noise already overspends
    assert accountants.epsilon([(sigma * 0.997, q, steps)], DELTA, accountant) > target
    # and the reference agrees the target holds (PLD within its discretisation)
    assert pld_epsilon([(sigma, q, steps)], DELTA) <= target * 1.01


def test_calibration_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("PRIVET_CACHE_DIR", str(tmp_path))
    accountants.calibrate_noise.cache_clear()
    first = accountants.calibrate_noise(2.0, DELTA, 0.03, 333, "rdp")
    assert "rdp|2.0|" in (tmp_path / "noise-calibration.json").read_text()
    accountants.calibrate_noise.cache_clear()
    monkeypatch.setattr(accountants, "_EPSILON", {})  # a cache hit must not compute
    assert accountants.calibrate_noise(2.0, DELTA, 0.03, 333, "rdp") == first


def test_ledger_is_cumulative_and_equals_the_composed_history():
    ledger = PrivacyLedger()
    spent = []
    for _ in range(5):
        ledger.record(1.1, 0.02, 50)
        spent.append(ledger.epsilon(DELTA, "pld"))
    assert all(a < b for a, b in zip(spent, spent[1:]))
    assert ledger.history == [(1.1, 0.02, 250)]
    assert spent[-1] == pytest.approx(pld_epsilon([(1.1, 0.02, 250)], DELTA), rel=0.01)
    # the ε after round 5 is not the ε of one round
    assert spent[-1] > 1.5 * spent[0]


def test_ledger_round_trips_and_predicts_the_next_round():
    ledger = PrivacyLedger()
    ledger.record(1.0, 0.02, 100)
    ledger.record(2.0, 0.02, 10)
    record = SpendRecord("r-client0", "r", "0", "adult", ALL_ROWS, "seeded", ledger.spends)
    restored, = MemoryStore.from_json(MemoryStore([record]).to_json()).records()
    assert restored == record and restored.history == tuple(ledger.history)
    assert ledger.steps == 110
    predicted = ledger.epsilon_after(2.0, 0.02, 10, DELTA, "rdp")
    ledger.record(2.0, 0.02, 10)
    assert predicted == ledger.epsilon(DELTA, "rdp")


def test_no_steps_no_spend():
    assert accountants.epsilon([], DELTA) == 0.0
    with pytest.raises(ValueError, match="accountant"):
        accountants.epsilon([(1, 0.1, 1)], DELTA, "moments")
