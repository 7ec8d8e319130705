"""DP-SGD step time over plain SGD, per model and way of clipping (privet's one-pass path,
Opacus' grad-sample modes), with seeded and with secure randomness.

    python -m experiments.bench_dpsgd [--repeats 5] [--only adult,digits,fashion-mnist]
                                      [--models mlp,embedding_mlp]
                                      [--modes one-pass,hooks,ghost] [--seeded-only]

Times steady-state local training (after a warm-up epoch) on one client's worth of rows,
side by side in one process, one torch thread; prints ms/step and the ratio to plain SGD for
seeded randomness (simulation: torch generators), then ms/step with secure randomness (a
deployed client: ChaCha20 from OS entropy, each Gaussian the sum of four) and its ratio to
seeded.
Workloads: on Adult client 0, the MLP, logistic regression and two users' models of
experiments/examples/tabular.py (the residual MLP: LayerNorm, Dropout, a residual addition,
not Sequential; embedding_mlp: an nn.Embedding per categorical column, given the feature
description); MLP and CNN on scikit-learn's 8x8 digits; the CNN on Fashion-MNIST (random
28x28 images when no local copy is found: step time does not depend on pixel values).
Each model's line "auto →" says which path `train.dp-path = "auto"` takes for it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from privet.clients import bookkeeping, train
from privet.clients.train import ONE_PASS
from privet.common.config import TrainConfig, load_config
from privet.common.data import images
from privet.common.models import build_model
from privet.common.privacy.randomness import SecureRandomness

MODES = (ONE_PASS, "hooks", "ghost")  # --modes may add Opacus' "functorch" and "ew"
SOURCES = ("seeded", "secure")  # where DP-SGD's draws come from (common.privacy.randomness)
FASHION_ROWS = 2000  # a third of an IID client's 6,000 of 10: enough steps, quicker
# a user's own model (non-Sequential, LayerNorm, Dropout), see experiments/examples
EXAMPLE = "experiments.examples.tabular:residual_mlp"
EMBEDDING = "experiments.examples.tabular:embedding_mlp"  # nn.Embedding per categorical


@dataclass(frozen=True)
class Workload:
    data: str
    models: tuple[str, ...]
    features: np.ndarray
    labels: np.ndarray
    num_classes: int
    source: str
    feature_spec: object = None  # tables: common.data.features.Features, for embedding_mlp


def adult() -> Workload:
    # Imported here so the image workloads run even while the tabular pipeline is elsewhere.
    from privet.common.data.datasets import client_data, num_classes

    cfg = load_config(overrides=["data.partition=iid"])
    data = client_data(cfg, 0)
    return Workload("adult", ("mlp", "logreg", EXAMPLE, EMBEDDING), data.features, data.labels,
                    num_classes(cfg),
                    f"Adult client 0 of {cfg.num_clients} (IID): {len(data)} rows",
                    data.feature_spec)


def digits() -> Workload:
    split = images.load_digits("train", seed=0, test_fraction=0.2)
    return Workload("digits", ("mlp", "cnn"), np.array(split.images), np.array(split.labels),
                    len(split.classes), f"digits train split: {len(split)} rows of 1x8x8")


def fashion_mnist() -> Workload:
    try:
        split = images.load_fashion_mnist("train")
        x, y = split.images[:FASHION_ROWS].copy(), split.labels[:FASHION_ROWS].copy()
        source = f"Fashion-MNIST from {images.fashion_mnist_dir()}"
    except FileNotFoundError:
        rng = np.random.default_rng(0)
        x = rng.random((FASHION_ROWS, 1, 28, 28), dtype=np.float32)
        y = rng.integers(0, 10, FASHION_ROWS).astype(np.int64)
        source = "RANDOM tensors (no local Fashion-MNIST)"
    return Workload("fashion", ("cnn",), x, y, 10, f"{source}: {len(y)} rows of 1x28x28")


WORKLOADS = {"adult": adult, "digits": digits,
             "fashion-mnist": fashion_mnist}


def build(model_name: str, work: Workload) -> torch.nn.Module:
    """The default train config (hidden 64) with this model; no dataset check applies."""
    return build_model(TrainConfig(model=model_name), work.features.shape[1:],
                       work.num_classes, work.feature_spec)


def time_per_step(model_name: str, mode: str | None, work: Workload, epochs: int,
                  seed: int, source: str = "seeded", device: str = "cpu") -> float:
    """Seconds per step of `mode` (None: plain SGD) with `source` randomness on `device`
    ("cpu", "cuda": clients.train.train_local's), after a warm-up epoch; the time includes
    moving the rows and the model to the device and back (once per epoch's call)."""
    model = build(model_name, work)
    kwargs = dict(batch_size=64, lr=0.1, momentum=0.0, seed=seed,
                  noise_multiplier=1.0 if mode else None, grad_sample_mode=mode or "hooks",
                  device=device)
    if source == "secure":  # else None: SeededRandomness(seed), as in simulation
        kwargs["randomness"] = SecureRandomness()
    train.train_local(model, work.features, work.labels, epochs=1, **kwargs)  # warm-up
    result = train.train_local(model, work.features, work.labels, epochs=epochs, **kwargs)
    return result.seconds / result.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated workloads out of {', '.join(WORKLOADS)}")
    parser.add_argument("--models", default="",
                        help="comma-separated model names (or the end of an import path, "
                             "e.g. embedding_mlp) to time; default: every workload's")
    parser.add_argument("--modes", default=",".join(MODES),
                        help="comma-separated DP-SGD paths: one-pass, hooks, ghost, "
                             "functorch, ew")
    parser.add_argument("--seeded-only", action="store_true",
                        help="skip the runs with secure randomness")
    args = parser.parse_args()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    all_modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    sources = SOURCES[:1] if args.seeded_only else SOURCES
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        parser.error(f"--only: unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    workloads = [WORKLOADS[n]() for n in names]
    print(f"{os.cpu_count()} cores, 1 torch thread; batch 64; median of {args.repeats} "
          f"repeats")
    for work in workloads:
        print(f"  {work.data}: {work.source}")
    print(f"{'data':8} {'model':13} {'mode':11} {'ms/step':>8} {'× plain':>8} "
          f"{'secure ms':>9} {'× seeded':>8}")
    for work in workloads:
        for model_name in work.models:
            if wanted and model_name.rsplit(":", 1)[-1] not in wanted:
                continue
            probe = build(model_name, work)
            modes = [m for m in all_modes if m != ONE_PASS or bookkeeping.supports(probe)]
            auto = train.dp_path(probe, example=torch.from_numpy(work.features[:1]),
                                 batch_size=64)
            runs = [("plain", "seeded")] + [(m, source) for m in modes for source in sources]
            timings: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
            failed: dict[str, str] = {}
            for r in range(args.repeats):  # interleaved, so machine noise hits all runs alike
                for mode, source in timings:
                    if mode in failed:
                        continue
                    try:
                        timings[mode, source].append(time_per_step(
                            model_name, None if mode == "plain" else mode, work,
                            args.epochs, seed=r, source=source))
                    except Exception as error:  # noqa: BLE001 - a mode without the layer
                        failed[mode] = type(error).__name__
            ms = {run: statistics.median(values) * 1000 for run, values in timings.items()
                  if values and run[0] not in failed}
            plain = ms["plain", "seeded"]
            shown = model_name.rsplit(":", 1)[-1][:13]
            print(f"{work.data:8} {shown:13} auto → {auto}")
            for mode in ["plain", *modes]:
                if mode in failed:
                    print(f"{work.data:8} {shown:13} {mode:11} unsupported ({failed[mode]})")
                    continue
                seeded = ms[mode, "seeded"]
                line = f"{work.data:8} {shown:13} {mode:11} {seeded:8.3f} "
                line += f"{seeded / plain:8.2f}"
                if (mode, "secure") in ms:
                    line += f" {ms[mode, 'secure']:9.3f} {ms[mode, 'secure'] / seeded:8.2f}"
                print(line)


if __name__ == "__main__":
    main()
