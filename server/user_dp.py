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
Adaptive Clipping") S follows a target quantile of the update norms, steered by a noisy
count of unclipped updates. That count is a second Gaussian query on the same clients:
the model noise is raised so that both releases together equal one Gaussian mechanism
with the calibrated noise multiplier (Flower's `compute_adaptive_noise_params`), and the
ledger records that effective multiplier.

Flower's DifferentialPrivacyServerSideFixedClipping does not fit: it samples a fixed
number of clients (no exact amplification), averages with the wrapped strategy's
example weights (a client's influence then exceeds S / n), and its accountant ignores
sampling.
"""

from __future__ import annotations

import math
import random
from typing import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import compute_adaptive_noise_params

from common.privacy.ledger import PrivacyLedger
from server.strategy import PrivetFedAvg, average_metrics

StateDict = dict[str, torch.Tensor]


def clipped_noisy_mean(global_state: StateDict, client_states: list[StateDict], clip: float,
                       noise_multiplier: float, expected_clients: float,
                       generator: torch.Generator) -> tuple[StateDict, list[float]]:
    """New global state = global + (Σ clip_S(update_i) + N(0, σ²S²)) / (p·N).

    Returns the new state and each client's update norm before clipping.
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
        noise = torch.normal(0.0, noise_multiplier * clip, size=total[k].shape,
                             generator=generator, dtype=total[k].dtype)
        new_state[k] = global_state[k] + (total[k] + noise) / expected_clients
    return new_state, norms


def adaptive_noise(noise_multiplier: float, expected_clients: float,
                   count_stddev: float | None) -> tuple[float, float]:
    """(count noise σ_b, model noise z_Δ) whose joint release has multiplier `noise_multiplier`:
    (z_Δ⁻² + (2σ_b)⁻²)^(-1/2) = z. Raises ValueError when σ_b is too small for that z."""
    return compute_adaptive_noise_params(noise_multiplier, expected_clients, count_stddev)


def effective_noise(model_noise: float, count_stddev: float) -> float:
    """Noise multiplier of the model and count queries released together."""
    return (model_noise ** -2 + (2 * count_stddev) ** -2) ** -0.5


class UserLevelDPFedAvg(PrivetFedAvg):
    def __init__(self, *, noise_multiplier: float, clip: float, sample_rate: float,
                 num_clients: int, seed: int, adaptive: bool = False,
                 target_quantile: float = 0.5, clip_lr: float = 0.2,
                 count_stddev: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.noise_multiplier, self.clip = noise_multiplier, clip
        self.sample_rate, self.num_clients = sample_rate, num_clients
        self.expected_clients = sample_rate * num_clients
        self.adaptive, self.target_quantile, self.clip_lr = adaptive, target_quantile, clip_lr
        self.count_stddev, self.model_noise = 0.0, noise_multiplier
        if adaptive:
            self.count_stddev, self.model_noise = adaptive_noise(
                noise_multiplier, self.expected_clients, count_stddev or None)
        self.clip_history: list[float] = []
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.ledger = PrivacyLedger()
        self._global: StateDict | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Poisson sampling: each node joins this round with probability p."""
        self._global = arrays.to_torch_state_dict()
        nodes = sorted(self.reachable(grid).get_node_ids())
        chosen = [n for n in nodes if self.rng.random() < self.sample_rate]
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return self.remember(self._construct_messages(record, chosen, MessageType.TRAIN))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        trained = [m for m in self.observe_replies(server_round, replies)
                   if not m.has_error()]
        assert self._global is not None, "configure_train sets the global model first"
        # The mechanism runs every round, even with no update to add: the release is
        # noise then, and it is accounted like any other round.
        new_state, norms = clipped_noisy_mean(
            self._global, [m.content["arrays"].to_torch_state_dict() for m in trained],
            self.clip, self.model_noise, self.expected_clients, self.generator)
        self.clip_history.append(self.clip)
        if self.adaptive:
            unclipped = sum(norm <= self.clip for norm in norms)
            noisy = unclipped + float(torch.normal(0.0, self.count_stddev, size=(1,),
                                                   generator=self.generator))
            fraction = noisy / self.expected_clients
            self.clip *= math.exp(-self.clip_lr * (fraction - self.target_quantile))
        # Both queries together are one Gaussian mechanism with the calibrated multiplier.
        self.ledger.record(effective_noise(self.model_noise, self.count_stddev)
                           if self.adaptive else self.model_noise, self.sample_rate, 1)
        metrics = average_metrics([m.content for m in trained], self.weighted_by_key) \
            if trained else MetricRecord({})
        return ArrayRecord(new_state), metrics
