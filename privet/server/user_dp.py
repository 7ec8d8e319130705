"""User-level DP-FedAvg (McMahan et al., 2018, "Learning Differentially Private Recurrent
Language Models").

Each round every client is sampled independently with probability p (Poisson sampling,
so privacy amplification by sampling applies exactly); the server clips each sampled
client's model update to L2 norm S, sums the clipped updates, adds Gaussian noise of
standard deviation σ·S, and divides by the *expected* cohort size p·N. One participant
then changes the released sum by at most S whatever the cohort, which is what the
accountant assumes: the composition of `rounds` Poisson-subsampled Gaussian mechanisms
with rate p and noise multiplier σ.

With adaptive clipping (Andrew et al., 2021, "Differentially Private Learning with
Adaptive Clipping", Algorithm 1 and its privacy analysis; TF-Privacy's
`QuantileEstimatorQuery`) S follows a target quantile γ of the update norms, steered by a
noisy count of unclipped updates. That count is a second Gaussian query on the same
clients, and it is *centred*: each sampled client contributes b_i − ½ ∈ {−½, +½} (b_i = 1
when its update norm is ≤ S), the server adds N(0, σ_b²) to the sum, and estimates the
unclipped fraction as noisy_sum / (p·N') + ½, N' the clients not left out. One participant more or less then moves the count by exactly ½:
its L2 sensitivity is Δ_b = ½ (`COUNT_SENSITIVITY`), against S for the model sum. The
clip then follows S ← S·exp(−η (fraction − γ)).

Both releases together are one Gaussian mechanism whose noise multiplier is
(z⁻² + (σ_b/Δ_b)⁻²)^(-1/2), z the model noise multiplier; the model noise is raised so
that this equals the calibrated σ (as Flower's `compute_adaptive_noise_params` does for
Δ_b = ½), and the ledger records that effective multiplier.

Every random draw the guarantee rests on — which clients are sampled, the noise on the
clipped sum, the noise on the count — comes from one `Randomness` object
(common.privacy.randomness): seeded for reproducible simulation, secure (ChaCha20 keyed
from the OS) where the seed must not void the guarantee.

Flower's DifferentialPrivacyServerSideFixedClipping does not fit: it samples a fixed
number of clients (no exact amplification), averages with the wrapped strategy's
example weights (a client's influence then exceeds S / n), and its accountant ignores
sampling.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Sequence

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from privet.common.privacy.ledger import PrivacyLedger
from privet.common.privacy.randomness import Randomness, SeededRandomness
from privet.server.strategies.after_noise import step_on_aggregate
from privet.server.strategy import PrivetFedAvg, average_metrics

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# L2 sensitivity of the centred unclipped count: one client adds or removes b_i − ½ = ±½
# (Andrew et al. 2021; TF-Privacy's QuantileEstimatorQuery sums the bits with clip ½).
COUNT_SENSITIVITY = 0.5


def clipped_noisy_mean(global_state: StateDict, client_states: list[StateDict], clip: float,
                       noise_multiplier: float, expected_clients: float,
                       randomness: Randomness) -> tuple[StateDict, list[float]]:
    """New global state = global + (Σ clip_S(update_i) + N(0, σ²S²)) / (p·N).

    `global_state` and each of `client_states` map the same keys to tensors of the same
    shapes; only floating-point entries are updated (the rest are copied from the global
    state). update_i = client_i − global, clipped to L2 norm `clip` over all floating
    entries together. The noise is `randomness.gaussian(shape, σ·S, dtype)`, one draw per
    floating tensor in the global state's key order. `expected_clients` is p·N (> 0).

    Returns the new state and each client's update norm before clipping (in client order).
    """
    keys = [k for k, v in global_state.items() if torch.is_floating_point(v)]
    total = {k: torch.zeros_like(global_state[k]) for k in keys}
    norms = []
    for state in client_states:
        update = {k: state[k] - global_state[k] for k in keys}
        norm = float(torch.sqrt(sum(u.pow(2).sum() for u in update.values())))
        norms.append(norm)
        scale = min(1.0, clip / norm) if norm > 0 else 1.0
        for k in keys:
            total[k] += update[k] * scale
    new_state = dict(global_state)
    for k in keys:
        noise = randomness.gaussian(total[k].shape, noise_multiplier * clip, total[k].dtype)
        new_state[k] = global_state[k] + (total[k] + noise) / expected_clients
    return new_state, norms


def centred_unclipped_count(norms: Sequence[float], clip: float) -> float:
    """Σ_i (b_i − ½), b_i = 1 if norms[i] ≤ clip else 0: the count query before its noise.

    `norms` are the sampled clients' update L2 norms (any length, 0 included), `clip` the
    clipping bound S in the same units. Adding or removing one client moves the result by
    exactly ½ (`COUNT_SENSITIVITY`) — Andrew et al. 2021, Algorithm 1 with the bits centred
    as in their privacy analysis and TF-Privacy's QuantileEstimatorQuery.
    """
    return sum((1.0 if norm <= clip else 0.0) - 0.5 for norm in norms)


def unclipped_fraction(noisy_centred_count: float, expected_clients: float) -> float:
    """Estimated fraction of updates within the clip: noisy Σ(b_i − ½) / (p·N) + ½.

    Unbiased for the true fraction when the cohort has its expected size p·N (Andrew et al.
    2021). Not clamped to [0, 1]: the noise may push it out, as in TF-Privacy."""
    return noisy_centred_count / expected_clients + 0.5


def next_clip(clip: float, fraction: float, target_quantile: float, clip_lr: float) -> float:
    """Geometric update S ← S·exp(−η (fraction − γ)) (Andrew et al. 2021, Algorithm 1)."""
    return clip * math.exp(-clip_lr * (fraction - target_quantile))


def adaptive_noise(noise_multiplier: float, expected_clients: float,
                   count_stddev: float | None,
                   count_sensitivity: float = COUNT_SENSITIVITY) -> tuple[float, float]:
    """(count noise σ_b, model noise z_Δ): their joint release has multiplier `noise_multiplier`.

    Solves (z_Δ⁻² + (σ_b/Δ_b)⁻²)^(-1/2) = z for z_Δ, Δ_b = `count_sensitivity` (Andrew et al.
    2021; the same as Flower's `compute_adaptive_noise_params` for Δ_b = ½). σ_b (in
    count units) defaults to p·N / 20, as in Flower and the paper. With z = 0 (no noise)
    returns (σ_b or 0, 0). Raises ValueError when σ_b/Δ_b ≤ z: the count alone would spend
    more than the whole budget.
    """
    if noise_multiplier <= 0:
        return (count_stddev or 0.0), 0.0
    if count_stddev is None:
        count_stddev = expected_clients / 20
    count_multiplier = count_stddev / count_sensitivity
    if noise_multiplier >= count_multiplier:
        raise ValueError(
            f"count noise σ_b = {count_stddev:g} (sensitivity {count_sensitivity:g}) is too "
            f"small for the noise multiplier {noise_multiplier:g}: σ_b / Δ must exceed it; "
            "raise privacy.user-count-stddev (the default is the expected cohort / 20)")
    model_noise = (noise_multiplier ** -2 - count_multiplier ** -2) ** -0.5
    if model_noise >= 2 * noise_multiplier:
        log.warning("adaptive clipping: the model noise is %.2f× the calibrated multiplier; "
                    "consider a larger count noise or cohort", model_noise / noise_multiplier)
    return count_stddev, model_noise


def effective_noise(model_noise: float, count_stddev: float,
                    count_sensitivity: float = COUNT_SENSITIVITY) -> float:
    """Noise multiplier of the model query (multiplier z, sensitivity S) and the count query
    (noise σ_b, sensitivity Δ_b) released together: (z⁻² + (σ_b/Δ_b)⁻²)^(-1/2).

    Gaussian queries on the same data compose as one Gaussian mechanism: scaled to unit
    noise, the pair (sum/(zS), count/σ_b) has L2 sensitivity √(z⁻² + (Δ_b/σ_b)²), so
    1/z_eff² = Σ (Δ_i/σ_i)² (Andrew et al. 2021; Dwork & Roth 2014, Appendix A)."""
    return (model_noise ** -2 + (count_stddev / count_sensitivity) ** -2) ** -0.5


class UserLevelDPFedAvg(PrivetFedAvg):
    """DP-FedAvg with Poisson client sampling, server-side clipping and noise, and optional
    adaptive clipping; its `ledger` holds the user-level (σ_eff, p, rounds) spending.

    `randomness` supplies every DP draw (client sampling, model noise, count noise); None
    means `SeededRandomness(seed)`, reproducible and only fit for simulation.
    `server_optimizer`: a Flower FedAvgM/FedAdam/FedYogi/FedAdagrad stepped on the noised
    mean (server.strategies.after_noise), or None for FedAvg's step (the mean itself).
    """

    count_sensitivity = COUNT_SENSITIVITY

    def __init__(self, *, noise_multiplier: float, clip: float, sample_rate: float,
                 num_clients: int, seed: int, adaptive: bool = False,
                 target_quantile: float = 0.5, clip_lr: float = 0.2,
                 count_stddev: float | None = None, randomness: Randomness | None = None,
                 server_optimizer=None, **kwargs) -> None:
        super().__init__(seed=seed, **kwargs)
        self.noise_multiplier, self.clip = noise_multiplier, clip
        self.sample_rate, self.num_clients = sample_rate, num_clients
        self.expected_clients = sample_rate * num_clients
        self.round_expected = self.expected_clients  # p × the nodes not left out, per round
        self.adaptive, self.target_quantile, self.clip_lr = adaptive, target_quantile, clip_lr
        self.count_stddev, self.model_noise = 0.0, noise_multiplier
        if adaptive:
            self.count_stddev, self.model_noise = adaptive_noise(
                noise_multiplier, self.expected_clients, count_stddev or None,
                self.count_sensitivity)
        self.randomness = randomness if randomness is not None else SeededRandomness(seed)
        self.clip_history: list[float] = []
        self.released_counts: list[float] = []  # the noisy centred counts, one per round
        self.ledger = PrivacyLedger()
        self.server_optimizer = server_optimizer
        self._global: StateDict | None = None

    @property
    def ledger_noise(self) -> float:
        """The noise multiplier recorded per round: the model query alone, or with adaptive
        clipping the joint (model, count) mechanism."""
        if not self.adaptive:
            return self.model_noise
        return effective_noise(self.model_noise, self.count_stddev, self.count_sensitivity)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Poisson sampling: each node (in id order) joins this round with probability p."""
        self._global = arrays.to_torch_state_dict()
        nodes = sorted(self.reachable(grid).get_node_ids())
        # Left-out (failed, too small) nodes are never sampled; each remaining one still joins
        # with probability p, the rate the ledger records. The sum is then divided by the
        # cohort expected of them, p·(remaining): the privacy is in the noise on the sum,
        # the divisor only keeps the average unbiased.
        self.round_expected = self.sample_rate * max(len(nodes), 1)
        draws = self.randomness.uniform(len(nodes))
        chosen = [n for n, u in zip(nodes, draws) if u < self.sample_rate]
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self.remember(self._construct_messages(record, chosen, MessageType.TRAIN))

    def release_count(self, norms: Sequence[float]) -> float:
        """The noisy centred count Σ(b_i − ½) + N(0, σ_b²) for this round's update norms."""
        noise = self.randomness.gaussian((1,), self.count_stddev, torch.float64)
        return centred_unclipped_count(norms, self.clip) + float(noise[0])

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        trained = [m for m in self.observe_replies(server_round, replies)
                   if not m.has_error()]
        assert self._global is not None, "configure_train sets the global model first"
        # The mechanism runs every round, even with no update to add: the release is
        # noise then, and it is accounted like any other round.
        new_state, norms = clipped_noisy_mean(
            self._global, [m.content["arrays"].to_torch_state_dict() for m in trained],
            self.clip, self.model_noise, self.round_expected, self.randomness)
        if self.server_optimizer is not None:  # after the noise: post-processing
            new_state = step_on_aggregate(self.server_optimizer, server_round, self._global,
                                          new_state)
        self.clip_history.append(self.clip)
        if self.adaptive:
            released = self.release_count(norms)
            self.released_counts.append(released)
            fraction = unclipped_fraction(released, self.round_expected)
            self.clip = next_clip(self.clip, fraction, self.target_quantile, self.clip_lr)
        # Both queries together are one Gaussian mechanism with the calibrated multiplier.
        self.ledger.record(self.ledger_noise, self.sample_rate, 1)
        metrics = average_metrics([m.content for m in trained], self.weighted_by_key) \
            if trained else MetricRecord({})
        return ArrayRecord(new_state), metrics
