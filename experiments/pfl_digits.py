"""pfl-research 0.6 on its best case, the workload `python -m experiments.bench --vs-pfl` times
privet against: scikit-learn's 8x8 digits over 100 users, 10 per round, 30 rounds, 2 local
epochs of batch 5, SGD lr 0.1 without momentum, an MLP with one hidden layer, no DP, the global
model evaluated on the held-out test set before training and after every round.

Run it with the pfl environment's python (it imports only pfl, torch, scikit-learn, numpy):

    ~/.cache/privet/pfl-env/bin/python experiments/pfl_digits.py --json out.json

Written the way pfl's authors write their benchmarks (benchmarks/image_classification/pytorch/
train.py, benchmarks/model/pytorch/dnn.py in apple/pfl-research): a torch module with `loss`
and `metrics` methods wrapped in PyTorchModel, a FederatedDataset of fixed users sampled by
pfl's own user sampler, SimulatedBackend, FederatedAveraging with a central SGD of learning
rate 1 (the plain average of the users' updates), WeightByUser (privet's
`strategy.weighting = "uniform"`), NNTrainHyperParams and a CentralEvaluationCallback.

The data are privet's, rebuilt here from the same seed rather than exported: privet's
`common/data/images.py` scales the pixels by 1/16 and holds out `test-fraction` of the rows
with sklearn's stratified `train_test_split(random_state=seed)`; `common/data/partition.py`'s
iid partition is `numpy.random.default_rng(seed).permutation(n)` cut by `numpy.array_split`
into num-clients sorted parts, part i being client i. Same seed, same users, row for row.

Evaluation work matches privet's: privet evaluates the global model on the server's test set
after every round and once before round 1 (Flower's evaluate_fn at round 0), and so does
CentralEvaluationCallback (on_train_begin, then every central iteration). pfl's algorithm also
evaluates each user's data before and after local training on iterations that are multiples
of `evaluation_frequency` (always iteration 0); privet's clients get their training metrics
from the training steps themselves, so by default that happens only where pfl forces it
(iteration 0); `--user-metrics` makes it every round.

Threads: one torch thread by default (`--threads`), as each of privet's pool workers runs. pfl
trains users one after another in one process; torch's default of one thread per core is no
faster on this model, and when the cores are busy two threads make a step of it ~50x slower
(spinning OpenMP workers), which would make pfl look slow for the wrong reason.
"""

from __future__ import annotations

import argparse
import json
import time

STARTED = time.perf_counter()


def digits(seed: int, test_fraction: float):
    """privet's digits split (common/data/images.py): pixels / 16 as float32 (N, 1, 8, 8),
    int64 labels, stratified hold-out with sklearn's random_state = seed."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)[:, None]
    labels = bunch.target.astype(np.int64)
    return train_test_split(images, labels, test_size=test_fraction, random_state=seed,
                            stratify=labels)


def iid(num_rows: int, num_clients: int, seed: int) -> list:
    """privet's iid partition (common/data/partition.py): sorted row indices per user."""
    import numpy as np

    order = np.random.default_rng(seed).permutation(num_rows)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def mlp(inputs: int, hidden: int, outputs: int):
    """privet's `mlp` (common/models.py): Flatten, Linear(inputs, hidden), ReLU,
    Linear(hidden, outputs); with pfl's loss/metrics methods attached as in pfl's
    benchmarks/model/pytorch/dnn.py."""
    import types

    import torch
    import torch.nn as nn
    from pfl.metrics import Weighted

    def loss(self, inputs, targets, eval=False):  # noqa: A002 - pfl's signature
        self.eval() if eval else self.train()
        return nn.functional.cross_entropy(self(inputs), targets)

    @torch.no_grad()
    def metrics(self, inputs, targets, eval=True):  # noqa: A002 - pfl's signature
        self.eval() if eval else self.train()
        logits = self(inputs)
        correct = (logits.argmax(-1) == targets).float().sum().item()
        total = nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        return {"loss": Weighted(total, len(inputs)), "accuracy": Weighted(correct, len(inputs))}

    model = nn.Sequential(nn.Flatten(), nn.Linear(inputs, hidden), nn.ReLU(),
                          nn.Linear(hidden, outputs))
    model.loss = types.MethodType(loss, model)
    model.metrics = types.MethodType(metrics, model)
    return model


def recorder():
    """A pfl callback keeping the central accuracy of every evaluation and when each round
    ended."""
    from pfl.callback.base import TrainingProcessCallback
    from pfl.metrics import Metrics

    class Record(TrainingProcessCallback):
        def __init__(self) -> None:
            self.accuracy: list[float] = []
            self.round_end: list[float] = []

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.round_end.append(time.perf_counter() - STARTED)
            for name, value in aggregate_metrics:
                if str(name) == "Central val | accuracy":
                    self.accuracy.append(float(getattr(value, "overall_value", value)))
            return False, Metrics()

    return Record()


def parser() -> argparse.ArgumentParser:
    """The workload's numbers; experiments/bench.py's VS_PFL gives privet the same."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--user-metrics", action="store_true",
                        help="pfl's per-user evaluation before and after local training every "
                             "round (default: only at iteration 0, where pfl always does it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, as each of privet's workers runs; pfl's "
                             "own default, one per core, is slower on this model and under load "
                             "two threads on two busy cores make a step ~50x slower); 0 = torch's "
                             "default")
    parser.add_argument("--json", help="write the result here")
    return parser


def main() -> None:
    args = parser().parse_args()
    import numpy as np
    import torch
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.central_evaluation import CentralEvaluationCallback
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.model.pytorch import PyTorchModel

    imported = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.random.manual_seed(args.seed)  # as pfl's benchmarks seed
    np.random.seed(args.seed)
    train_x, test_x, train_y, test_y = digits(args.seed, args.test_fraction)
    parts = iid(len(train_y), args.clients, args.seed)
    users = {i: (torch.from_numpy(train_x[rows]), torch.from_numpy(train_y[rows]))
             for i, rows in enumerate(parts)}
    # pfl's recommended sampler: each user once before any is reused (a seeded order)
    order = [int(u) for u in np.random.default_rng(args.seed).permutation(args.clients)]
    training = FederatedDataset.from_slices(users, get_user_sampler("minimize_reuse", order))
    central = Dataset(raw_data=[torch.from_numpy(test_x), torch.from_numpy(test_y)])
    loaded = time.perf_counter()

    module = mlp(int(np.prod(train_x.shape[1:])), args.hidden, 10)
    params = [p for p in module.parameters() if p.requires_grad]
    model = PyTorchModel(model=module, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(params, 1.0))
    built = time.perf_counter()  # torch's first optimizer imports torch._dynamo (~1 s)
    backend = SimulatedBackend(training_data=training, val_data=None,
                               postprocessors=[WeightByUser()])
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=args.rounds,
        evaluation_frequency=1 if args.user_metrics else args.rounds + 1,
        train_cohort_size=args.per_round, val_cohort_size=0)
    train_params = NNTrainHyperParams(local_learning_rate=args.lr,
                                      local_num_epochs=args.epochs,
                                      local_batch_size=args.batch_size)
    eval_params = NNEvalHyperParams(local_batch_size=None)  # the test set in one batch
    record = recorder()
    FederatedAveraging().run(
        algorithm_params=algorithm_params, backend=backend, model=model,
        model_train_params=train_params, model_eval_params=eval_params,
        callbacks=[CentralEvaluationCallback(central, model_eval_params=eval_params,
                                             frequency=1), record])
    finished = time.perf_counter()
    result = {"accuracy": record.accuracy[-1], "accuracies": record.accuracy,
              "evaluations": len(record.accuracy) + 1,  # + the one before training
              "rounds": args.rounds, "import_s": imported - STARTED,
              "data_s": loaded - imported, "model_s": built - loaded,
              "train_s": finished - built,
              "round_end_s": record.round_end, "torch_threads": torch.get_num_threads(),
              "train_rows": int(len(train_y)), "test_rows": int(len(test_y)),
              "user_sizes": [int(len(p)) for p in parts]}
    print(f"pfl: test accuracy {result['accuracy']:.4f} after {args.rounds} rounds; imports "
          f"{result['import_s']:.2f} s, data {result['data_s']:.2f} s, model and optimizer "
          f"{result['model_s']:.2f} s, rounds "
          f"{result['train_s']:.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
