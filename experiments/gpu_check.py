"""The GPU against the CPU: the DP-SGD step benchmark and the default experiment on each.

    python -m experiments.gpu_check [--repeats 3] [--epochs 2] [--only adult,digits]
                                    [--modes one-pass,hooks,ghost] [--skip-simulate]
                                    [--set key=value ...]

Needs a machine where torch finds a CUDA GPU; elsewhere it says so in one line and exits 1.
Then:

1. experiments/bench_dpsgd.py's step benchmark (seeded noise, batch 64, one client's rows,
   after a warm-up epoch) for each workload, model and DP-SGD path plus plain SGD, with
   `train.device` "cpu" (one torch thread, as each simulated client has) and "cuda",
   interleaved; prints the median ms/step of each and CPU time / GPU time.
2. The default experiment (`privet simulate`, experiments/configs/adult.toml, with any
   `--set` given) with `train.device = "cpu"` and then `"cuda"`: wall time from launch to
   exit (start-up included), final test accuracy and the largest client ε of each.

Seeded noise is drawn on the CPU in both (clients.train's module doc): the two runs take the
same rows and noise, so accuracy and ε should agree to the rounding of the GPU's arithmetic
(ε exactly: it depends on σ, q and steps only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from experiments import bench_dpsgd
from privet.clients import bookkeeping
from privet.clients.train import ONE_PASS
from privet.common.config import DEFAULT_CONFIG, PROJECT_DIR
from privet.common.device import resolve_device

DEVICES = ("cpu", "cuda")  # train.device values: the baseline, then the GPU


def no_cuda() -> str | None:
    """Why this machine cannot run the check (one line), or None when torch finds a GPU."""
    if torch.cuda.is_available():
        return None
    build = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
             else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no GPU")
    return f"experiments.gpu_check: no CUDA GPU here ({build}); nothing to compare"


def step_benchmark(names: list[str], modes: list[str], repeats: int, epochs: int) -> None:
    """Part 1: ms per step on each of `DEVICES`, side by side, and the first's time over the
    second's."""
    torch.set_num_threads(1)
    targets = {name: resolve_device(name) for name in DEVICES}
    base, other = DEVICES
    warnings.filterwarnings("ignore")
    workloads = [bench_dpsgd.WORKLOADS[n]() for n in names]
    print(f"DP-SGD step, batch 64, seeded noise; CPU: 1 torch thread; median of {repeats}")
    for work in workloads:
        print(f"  {work.data}: {work.source}")
    print(f"{'data':8} {'model':13} {'mode':9} {base + ' ms':>8} {other + ' ms':>8} "
          f"{base + '/' + other:>9}")
    for work in workloads:
        for model_name in work.models:
            probe = bench_dpsgd.build(model_name, work)
            usable = [m for m in modes if m != ONE_PASS or bookkeeping.supports(probe)]
            runs = [(mode, device) for mode in ["plain", *usable] for device in DEVICES]
            timings: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
            failed: dict[str, str] = {}
            for r in range(repeats):  # interleaved: the machine's noise hits all alike
                for mode, device in runs:
                    if mode in failed:
                        continue
                    try:
                        timings[mode, device].append(bench_dpsgd.time_per_step(
                            model_name, None if mode == "plain" else mode, work, epochs,
                            seed=r, device=targets[device]))
                    except Exception as error:  # noqa: BLE001 - a mode without the layer
                        failed[mode] = f"{type(error).__name__}: {str(error)[:60]}"
            shown = model_name.rsplit(":", 1)[-1][:13]
            for mode in ["plain", *usable]:
                if mode in failed:
                    print(f"{work.data:8} {shown:13} {mode:9} failed ({failed[mode]})")
                    continue
                first, second = (statistics.median(timings[mode, d]) * 1000 for d in DEVICES)
                print(f"{work.data:8} {shown:13} {mode:9} {first:8.3f} {second:8.3f} "
                      f"{first / second:9.2f}")


def simulate(device: str, settings: list[str], out: Path) -> dict:
    """`privet simulate` of the default experiment on `device`; its wall time in seconds,
    accuracy, largest client ε and where it ran (summary.json's device). Raises
    RuntimeError with the run's last output when it fails."""
    args = [sys.executable, "-m", "privet.experiments.cli", "simulate", "--config",
            str(DEFAULT_CONFIG), "--out", str(out), "--set", f'train.device="{device}"']
    for setting in settings:
        args += ["--set", setting]
    start = time.perf_counter()
    done = subprocess.run(args, cwd=PROJECT_DIR, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"privet simulate on {device} failed ({done.returncode}):\n"
                           + (done.stdout + done.stderr)[-3000:])
    summary = json.loads((out / "summary.json").read_text())
    return {"seconds": seconds, "accuracy": summary.get("accuracy"),
            "epsilon": summary["privacy"].get("max_epsilon"), "device": summary.get("device"),
            "status": summary["status"]}


def simulation_check(settings: list[str]) -> None:
    """Part 2: the default experiment on each of `DEVICES` (with `settings`, `--set`
    overrides), one after the other."""
    print(f"\nprivet simulate {DEFAULT_CONFIG.relative_to(PROJECT_DIR)}"
          + "".join(f" --set {s}" for s in settings) + f"; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory(prefix="privet-gpu-check-") as folder:
        results = {d: simulate(d, settings, Path(folder) / d) for d in DEVICES}
    print(f"{'device':7} {'wall s':>8} {'accuracy':>9} {'max ε':>8}  status, where")
    for device, r in results.items():
        accuracy = "n/a" if r["accuracy"] is None else f"{r['accuracy']:.4f}"
        epsilon = "n/a" if r["epsilon"] is None else f"{r['epsilon']:.4f}"
        print(f"{device:7} {r['seconds']:8.1f} {accuracy:>9} {epsilon:>8}  {r['status']}, "
              f"{r['device']}")
    base, other = DEVICES
    print(f"{base}/{other} wall time: "
          f"{results[base]['seconds'] / results[other]['seconds']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--only", default=",".join(bench_dpsgd.WORKLOADS),
                        help="comma-separated workloads out of "
                             f"{', '.join(bench_dpsgd.WORKLOADS)}")
    parser.add_argument("--modes", default=",".join(bench_dpsgd.MODES),
                        help="comma-separated DP-SGD paths: one-pass, hooks, ghost")
    parser.add_argument("--skip-simulate", action="store_true",
                        help="the step benchmark only")
    parser.add_argument("--set", dest="settings", action="append", default=[],
                        metavar="KEY=VALUE", help="an override for the default experiment, "
                                                  "e.g. rounds=5 (repeatable)")
    args = parser.parse_args()
    why = no_cuda()
    if why:
        print(why, file=sys.stderr)
        sys.exit(1)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(bench_dpsgd.WORKLOADS))
    if unknown:
        parser.error(f"--only: unknown workload(s) {unknown}; choose from "
                     f"{list(bench_dpsgd.WORKLOADS)}")
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}, CUDA "
          f"{torch.version.cuda}")
    step_benchmark(names, [m.strip() for m in args.modes.split(",") if m.strip()],
                   args.repeats, args.epochs)
    if not args.skip_simulate:
        simulation_check(args.settings)


if __name__ == "__main__":
    main()
