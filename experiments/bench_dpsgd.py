"""DP-SGD step time over plain SGD, per model and Opacus grad-sample mode.

    python -m experiments.bench_dpsgd [--repeats 5]

Times steady-state local training (after a warm-up epoch) on one Adult client's rows,
side by side in one process, one torch thread; prints ms/step and the ratio to plain SGD.
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings

import torch

from clients import train
from common.config import load_config
from common.data.datasets import client_data, num_classes
from common.models import build_model

MODES = ("hooks", "ghost", "functorch")


def time_per_step(model_name: str, mode: str | None, data, epochs: int, seed: int) -> float:
    cfg = load_config(overrides=[f"train.model={model_name}"])
    model = build_model(cfg.train, data.features.shape[1:], num_classes("adult"))
    kwargs = dict(batch_size=64, lr=0.1, momentum=0.0, seed=seed,
                  noise_multiplier=1.0 if mode else None, grad_sample_mode=mode or "hooks")
    train.train_local(model, data.features, data.labels, epochs=1, **kwargs)  # warm-up
    result = train.train_local(model, data.features, data.labels, epochs=epochs, **kwargs)
    return result.seconds / result.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    cfg = load_config(overrides=["data.partition=iid"])
    data = client_data(cfg, 0)
    print(f"{os.cpu_count()} cores, 1 torch thread; Adult client 0: {len(data)} rows, "
          f"batch 64; median of {args.repeats} repeats")
    print(f"{'model':8} {'mode':10} {'ms/step':>8} {'× plain':>8}")
    for model_name in ("mlp", "logreg"):
        timings: dict[str, list[float]] = {m: [] for m in ("plain",) + MODES}
        for r in range(args.repeats):  # interleaved, so machine noise hits all modes alike
            for mode in timings:
                timings[mode].append(time_per_step(model_name, None if mode == "plain" else mode,
                                                   data, args.epochs, seed=r))
        plain = statistics.median(timings["plain"])
        for mode, values in timings.items():
            ms = statistics.median(values) * 1000
            print(f"{model_name:8} {mode:10} {ms:8.3f} {ms / (plain * 1000):8.2f}")


if __name__ == "__main__":
    main()
