"""What crosses the wire: weights as ArrayRecord, metrics under fixed names."""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord
from torch import nn

# Reply metrics of a training round (MetricRecord keys).
NUM_EXAMPLES = "num-examples"   # FedAvg's weighting key
CLIENT_ID = "client-id"
DECLINED = "declined"           # 1 when the client refused to train (budget spent)
TOO_SMALL = "too-small"         # 1 when its data is smaller than a batch: left out
FAILED = "failed"               # 1 when the client's work raised: named, left out
FAILURE = "failure"             # reply ConfigRecord of a failed client: {"reason": text}
TRAIN_LOSS = "train-loss"
TRAIN_ACCURACY = "train-accuracy"
EPSILON = "epsilon"             # ε spent over all rounds so far (sample-level)
TARGET_EPSILON = "target-epsilon"  # the client's own sample-level target
STEPS = "steps"
NOISE_MULTIPLIER = "noise-multiplier"
SAMPLE_RATE = "sample-rate"
TRAIN_SECONDS = "train-seconds"
ACCOUNTING_SECONDS = "accounting-seconds"  # noise calibration and ε queries this round
DATA_PREFIX = "data-"            # + a CleaningReport field: what cleaning did to the rows
DP_PATH = "dp-path"              # how DP-SGD computed the clipped gradients: DP_PATHS[i]
DP_PATHS = ("one-pass", "hooks", "ghost", "functorch", "ew")  # clients.train's names
DEVICE = "device"                # where the client trained: common.device.device_code
EVAL_LOSS = "eval-loss"          # a client's evaluation of the global model
EVAL_ACCURACY = "eval-accuracy"
# Message config keys (ConfigRecord "config")
TRANSFORM = "transform"          # the shared preprocessing transform, as JSON
STAGE = "stage"                  # federated preprocessing: which statistics to send
RUN = "run"                      # the run's id: spend recorded under it is "this run's"
BOUNDS = "bounds"                # federated preprocessing: ranges estimated with DP, as JSON
# Reply ConfigRecord "privacy", key "ledger": what the client has spent, as JSON
# (common.privacy.report.client_report): every reply of a client that may have spent has one
PRIVACY = "privacy"
LEDGER = "ledger"
# Averaged by the strategy; the rest are per-client facts, recorded not averaged.
AVERAGED = (TRAIN_LOSS, TRAIN_ACCURACY)


def to_arrays(model: nn.Module) -> ArrayRecord:
    return ArrayRecord(OrderedDict((k, v.detach().cpu()) for k, v in model.state_dict().items()))


def load_arrays(model: nn.Module, arrays: ArrayRecord) -> None:
    model.load_state_dict(arrays.to_torch_state_dict(), strict=True)


def state_dict(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def update_digest(digest, arrays: ArrayRecord) -> None:
    """Feed every array of `arrays` (name, dtype, shape, bytes, in order) into a hashlib
    object: what a release's fingerprint is built from (privacy.ledger.DataLedger.reserve)."""
    for name, array in arrays.items():
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.data)
