"""privet end to end against the compute floor, on reference workloads.

    python -m experiments.bench [--repeats 3] [--only adult,digits,fashion-mnist]
    python -m experiments.bench --memory [--clients 1000]
    python -m experiments.bench --vs-pfl [--pairs 5] [--pfl-env PATH]

Each repeat runs, side by side and in turns, as separate processes timed from launch to exit
(start-up included):
  (a) privet: `privet simulate` through Flower's simulation runtime;
  (b) the compute floor: the same data, preprocessing, model, local steps and DP-SGD
      (Poisson sampling, per-example clipping, noise), FedAvg and server evaluation, in a
      plain loop in one process: no federated framework, no privacy accounting;
  (c) privet without DP (`privacy.level = "none"`).
Then prints medians, the ratios a/b and a/c, the share of a's wall time its clients spent on
privacy accounting (noise calibration and ε queries, summed over clients and divided by the
actors running at once) and the orchestration overhead per client message after round 1:
(rounds 2.. wall time − client compute / actors − server evaluation) / messages.

`--memory` runs privet with many small clients (Adult, IID, 10 per round, 20 rounds) and
samples the proportional set size (PSS) of the whole process tree (driver, Ray, actors) twice a
second: peak, and the total at each round's end, which should not grow with rounds.

`--vs-pfl` times privet against pfl-research 0.6 on pfl's best case (issue 18): 8x8 digits, 100
users, 10 per round, 30 rounds, 2 local epochs of batch 5, SGD lr 0.1 without momentum, an MLP
with 64 hidden units, no DP, the global model evaluated on the test set every round; both sides
get the same split and the same 100 users (experiments/pfl_digits.py rebuilds privet's from the
seed). privet runs as users run it (`python -m privet simulate --config digits.toml --set ...`);
pfl runs experiments/pfl_digits.py in an environment of its own (torch 2.13.0, pfl 0.6.0,
scikit-learn; made under --pfl-env when missing, outside privet's dependencies), on one torch
thread (--pfl-threads), its fastest setting here. Pairs alternate who goes first; each run is a
whole process timed from launch to exit, its process tree's peak PSS sampled every 0.2 s, its
CPU time (user + system, the whole tree: less swayed by other load than wall time) and the
1-minute load average read before and after it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from privet.common.config import PROJECT_DIR

CONFIGS = PROJECT_DIR / "experiments" / "configs"


@dataclass(frozen=True)
class Workload:
    config: Path
    overrides: tuple[str, ...] = ()


WORKLOADS = {
    "adult": Workload(CONFIGS / "adult.toml"),
    # pfl-research's reference task: 100 users of 8x8 digits (~14 rows each), 10 per round
    "digits": Workload(CONFIGS / "digits.toml", (
        "num-clients=100", "clients-per-round=10", "data.partition=iid", "data.min-rows=8",
        "train.batch-size=8")),
    "fashion-mnist": Workload(CONFIGS / "fashion-mnist.toml"),
}


def floor(name: str) -> dict:
    """The compute floor of one workload, in this process; returns its timings."""
    import numpy as np
    import torch

    from privet.clients.train import dp_path, train_local
    from privet.common.config import load_config
    from privet.common.data.datasets import client_data, num_classes, test_data
    from privet.common.evaluation import evaluate
    from privet.common.models import build_model

    work = WORKLOADS[name]
    cfg = load_config(work.config, list(work.overrides))
    spent = {"load": 0.0, "train": 0.0, "evaluate": 0.0}
    started = time.perf_counter()
    test = test_data(cfg)
    model = build_model(cfg.train, test.features.shape[1:], num_classes(cfg), test.feature_spec)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    spent["load"] += time.perf_counter() - started
    rng = np.random.default_rng(cfg.seed)
    data = {}
    private = cfg.privacy.level in ("sample", "both")
    for server_round in range(1, cfg.rounds + 1):
        states, weights = [], []
        for client in rng.choice(cfg.num_clients, cfg.clients_per_round, replace=False):
            tick = time.perf_counter()
            if client not in data:
                data[client] = client_data(cfg, int(client))
            share = data[client]
            spent["load"] += time.perf_counter() - tick
            if len(share) < cfg.train.batch_size:
                continue
            model.load_state_dict(global_state)
            result = train_local(
                model, share.features, share.labels, epochs=cfg.train.local_epochs,
                batch_size=cfg.train.batch_size, lr=cfg.train.lr, momentum=cfg.train.momentum,
                seed=server_round * 1009 + int(client),
                noise_multiplier=1.0 if private else None,  # step cost does not depend on σ
                max_grad_norm=cfg.privacy.max_grad_norm,
                grad_sample_mode=dp_path(model))
            spent["train"] += result.seconds
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            weights.append(len(share))
        tick = time.perf_counter()
        total = sum(weights)
        global_state = {k: sum(s[k] * (w / total) for s, w in zip(states, weights))
                        for k in global_state}
        model.load_state_dict(global_state)
        _, accuracy = evaluate(model, test.features, test.labels)
        spent["evaluate"] += time.perf_counter() - tick
    return {**spent, "accuracy": accuracy, "rounds": cfg.rounds,
            "seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}


def _timed(command: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, cwd=PROJECT_DIR)
    seconds = time.perf_counter() - start
    if code:
        raise SystemExit(f"{' '.join(command)} failed ({code}); see {log}")
    return seconds


def _simulate(work: Workload, out: Path, extra: tuple[str, ...] = ()) -> list[str]:
    command = [sys.executable, "-m", "privet.experiments.cli", "simulate", "--config",
               str(work.config), "--out", str(out), "--overwrite"]
    for assignment in (*work.overrides, *extra):
        command += ["--set", assignment]
    return command


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def run_analysis(run_dir: Path, wall: float, evaluate_per_round: float) -> dict:
    """Accounting share and per-message overhead of one privet run, from its own records."""
    from privet.common.config import load_config

    cfg = load_config(run_dir / "config.toml")
    actors = max(1, min(_cores(), cfg.clients_per_round))
    clients = _rows(run_dir / "metrics.csv")
    rounds = _rows(run_dir / "rounds.csv")
    accounting = sum(float(r["accounting_seconds"] or 0) for r in clients)
    later = [r for r in clients if int(r["round"]) > 1]
    compute = sum(float(r["train_seconds"] or 0) + float(r["accounting_seconds"] or 0)
                  for r in later)
    span = float(rounds[-1]["elapsed_seconds"]) - float(rounds[0]["elapsed_seconds"])
    overhead = span - compute / actors - evaluate_per_round * (len(rounds) - 1)
    return {"accounting_share": accounting / actors / wall, "accounting_seconds": accounting,
            "overhead_ms": 1000 * overhead / max(len(later), 1), "messages": len(later),
            "accuracy": float(rounds[-1]["test_accuracy"]), "actors": actors}


def bench(names: list[str], repeats: int, keep: Path | None) -> None:
    root = keep or Path(tempfile.mkdtemp(prefix="privet-bench-"))
    print(f"{_cores()} cores; median of {repeats} repeats; runs in {root}")
    table = []
    for name in names:
        work = WORKLOADS[name]
        walls: dict[str, list[float]] = {"privet": [], "floor": [], "privet-nodp": []}
        analyses, floors = [], []
        for r in range(repeats):
            base = root / name / f"r{r}"
            base.mkdir(parents=True, exist_ok=True)
            walls["privet"].append(_timed(_simulate(work, base / "privet"),
                                          base / "privet.log"))
            floor_json = base / "floor.json"
            walls["floor"].append(_timed(
                [sys.executable, "-m", "experiments.bench", "--floor", name, "--json",
                 str(floor_json)], base / "floor.log"))
            floors.append(json.loads(floor_json.read_text()))
            walls["privet-nodp"].append(_timed(
                _simulate(work, base / "privet-nodp", ("privacy.level=none",)),
                base / "privet-nodp.log"))
            per_round_eval = floors[-1]["evaluate"] / floors[-1]["rounds"]
            analyses.append(run_analysis(base / "privet", walls["privet"][-1], per_round_eval))
            print(f"  {name} repeat {r + 1}: privet {walls['privet'][-1]:.1f} s, floor "
                  f"{walls['floor'][-1]:.1f} s, privet without DP "
                  f"{walls['privet-nodp'][-1]:.1f} s", flush=True)
        med = {k: statistics.median(v) for k, v in walls.items()}
        table.append({
            "workload": name, **{f"{k}_s": round(v, 2) for k, v in med.items()},
            "privet/floor": round(med["privet"] / med["floor"], 2),
            "privet/nodp": round(med["privet"] / med["privet-nodp"], 2),
            "accounting_%": round(100 * statistics.median(
                a["accounting_share"] for a in analyses), 1),
            "overhead_ms/msg": round(statistics.median(a["overhead_ms"] for a in analyses), 1),
            "accuracy": analyses[0]["accuracy"],
            "floor_accuracy": round(floors[0]["accuracy"], 4),
            "floor_train_s": round(statistics.median(f["train"] for f in floors), 2),
            "floor_load_s": round(statistics.median(f["load"] for f in floors), 2),
            "floor_eval_s": round(statistics.median(f["evaluate"] for f in floors), 2),
        })
    keys = list(table[0])
    print()
    print(" | ".join(keys))
    for row in table:
        print(" | ".join(str(row[k]) for k in keys))


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory(clients: int, rounds: int, keep: Path | None) -> None:
    root = keep or Path(tempfile.mkdtemp(prefix="privet-memory-"))
    root.mkdir(parents=True, exist_ok=True)
    run_dir = root / f"adult-{clients}"
    work = WORKLOADS["adult"]
    command = _simulate(work, run_dir, (
        f"num-clients={clients}", "clients-per-round=10", f"rounds={rounds}",
        "data.partition=iid", "data.min-rows=16", "train.batch-size=16"))
    log = open(root / "memory.log", "w")
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=PROJECT_DIR)
    samples: list[tuple[float, int, int]] = []  # (seconds, rounds done, PSS KiB)
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total = sum(_pss_kib(pid) for pid in _descendants(process.pid))
            done = 0
            try:
                done = max(0, len(_rows(run_dir / "rounds.csv")))
            except (OSError, csv.Error):
                pass
            samples.append((time.perf_counter() - start, done, total))
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    stop.set()
    sampler.join()
    if code:
        raise SystemExit(f"the run failed ({code}); see {root / 'memory.log'}")
    peak = max(samples, key=lambda s: s[2])
    by_round: dict[int, int] = {}
    for _, done, kib in samples:
        by_round[done] = max(by_round.get(done, 0), kib)
    print(f"{clients} clients, 10 per round, {rounds} rounds: {time.perf_counter() - start:.1f} s;"
          f" peak PSS of the process tree {peak[2] / 1024:.0f} MiB at {peak[0]:.0f} s")
    print("rounds done → peak PSS (MiB) while at that count:")
    print("  " + ", ".join(f"{r}: {kib / 1024:.0f}" for r, kib in sorted(by_round.items())))


# --- privet against pfl-research on pfl's best case -------------------------------------

PFL_REQUIREMENTS = ("torch==2.13.0", "pfl==0.6.0", "scikit-learn")
PFL_SCRIPT = PROJECT_DIR / "experiments" / "pfl_digits.py"
DEFAULT_PFL_ENV = Path.home() / ".cache" / "privet" / "pfl-env"
# the workload, on privet's side: experiments/pfl_digits.py's defaults are the same numbers
VS_PFL = Workload(CONFIGS / "digits.toml", (
    "seed=42", "num-clients=100", "clients-per-round=10", "rounds=30",
    "data.partition=iid", "data.test-fraction=0.2", "data.min-rows=5",
    "train.model=mlp", "train.hidden=64", "train.local-epochs=2", "train.batch-size=5",
    "train.lr=0.1", "train.momentum=0", "strategy.name=fedavg", "strategy.weighting=uniform",
    "evaluation.mode=server", "privacy.level=none"))


def pfl_python(env: Path) -> Path:
    """The pfl environment's python, made (venv + pip) when it is missing or broken."""
    python = env / "bin" / "python"
    probe = [str(python), "-c", "import pfl, torch, sklearn"]
    if python.exists() and subprocess.call(probe, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL) == 0:
        return python
    print(f"making the pfl environment in {env} ({', '.join(PFL_REQUIREMENTS)})", flush=True)
    env.parent.mkdir(parents=True, exist_ok=True)
    subprocess.check_call(["python3", "-m", "venv", str(env)])
    pip = [str(python), "-m", "pip", "install", "--quiet"]
    subprocess.check_call(pip + ["--upgrade", "pip"])
    # the CPU build of torch (PyPI's Linux wheel pulls CUDA), then pfl against it
    subprocess.check_call(pip + [PFL_REQUIREMENTS[0], "--index-url",
                                 "https://download.pytorch.org/whl/cpu"])
    subprocess.check_call(pip + list(PFL_REQUIREMENTS))
    subprocess.check_call(probe)
    return python


@dataclass
class Measured:
    wall: float
    peak_pss_kib: int
    load_before: float
    load_after: float
    cpu: float = float("nan")  # user + system seconds of the whole process tree
    accuracy: float = float("nan")


def _adopt_orphans() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux), so that the CPU time
    of processes that outlive their parent (privet's fork server and pool workers: the driver
    leaves with os._exit) still reaches RUSAGE_CHILDREN once they are reaped here."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _sampled(command: list[str], log: Path, env: dict | None = None,
             every: float = 0.2) -> Measured:
    """Run `command` to its exit, timed from launch; its process tree's PSS sampled `every`
    seconds (the peak kept) and the 1-minute load average read before and after."""
    load_before = os.getloadavg()[0]
    peak = 0
    stop = threading.Event()
    adopted = _adopt_orphans()
    cpu_before = _children_cpu()
    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   cwd=PROJECT_DIR, env=env)

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, sum(_pss_kib(pid) for pid in _descendants(process.pid)))
                stop.wait(every)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        code = process.wait()
        wall = time.perf_counter() - start
        load_after = os.getloadavg()[0]
        stop.set()
        sampler.join()
        while adopted:  # the orphans it left: reaped here, their CPU time counted
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
    if code:
        raise SystemExit(f"{' '.join(map(str, command))} failed ({code}); see {log}")
    cpu = _children_cpu() - cpu_before if adopted else float("nan")
    return Measured(wall, peak, load_before, load_after, cpu)


def _privet_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_DIR), env.get("PYTHONPATH", "")) if p)
    return env


def _privet_vs_pfl(out: Path) -> Measured:
    command = [sys.executable, "-m", "privet", "simulate", "--config", str(VS_PFL.config),
               "--out", str(out), "--overwrite"]
    for assignment in VS_PFL.overrides:
        command += ["--set", assignment]
    measured = _sampled(command, out.with_suffix(".log"), _privet_env())
    measured.accuracy = float(_rows(out / "rounds.csv")[-1]["test_accuracy"])
    return measured


def _pfl(python: Path, out: Path, threads: int) -> Measured:
    result = out.with_suffix(".json")
    measured = _sampled([str(python), str(PFL_SCRIPT), "--json", str(result),
                         "--threads", str(threads)], out.with_suffix(".log"))
    measured.accuracy = float(json.loads(result.read_text())["accuracy"])
    return measured


def vs_pfl(pairs: int, env: Path, threads: int, keep: Path | None) -> None:
    python = pfl_python(env)
    root = keep or Path(tempfile.mkdtemp(prefix="privet-vs-pfl-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"{_cores()} cores; {pairs} alternated pairs; pfl from {python} on {threads} torch "
          f"thread(s); runs in {root}", flush=True)
    runs: dict[str, list[Measured]] = {"privet": [], "pfl": []}
    for pair in range(1, pairs + 1):
        order = ("privet", "pfl") if pair % 2 else ("pfl", "privet")
        for side in order:
            out = root / f"pair{pair}-{side}"
            m = (_privet_vs_pfl(out) if side == "privet" else _pfl(python, out, threads))
            runs[side].append(m)
            print(f"  pair {pair} {side:6s}: {m.wall:6.2f} s  CPU {m.cpu:6.2f} s  accuracy "
                  f"{m.accuracy:.4f}  peak PSS {m.peak_pss_kib / 1024:5.0f} MiB  load "
                  f"{m.load_before:.2f} → {m.load_after:.2f}", flush=True)
    summary = {}
    print()
    print("side   | wall s: median (min–max) | CPU s: median (min–max) | peak PSS MiB: median "
          "(min–max) | accuracy")
    for side, ms in runs.items():
        walls = [m.wall for m in ms]
        cpus = [m.cpu for m in ms]
        pss = [m.peak_pss_kib / 1024 for m in ms]
        summary[side] = {"wall_median": statistics.median(walls), "wall_min": min(walls),
                         "wall_max": max(walls), "cpu_median": statistics.median(cpus),
                         "pss_median_mib": statistics.median(pss),
                         "pss_min_mib": min(pss), "pss_max_mib": max(pss),
                         "accuracy": statistics.median(m.accuracy for m in ms),
                         "runs": [m.__dict__ for m in ms]}
        print(f"{side:6s} | {summary[side]['wall_median']:6.2f} ({min(walls):.2f}–"
              f"{max(walls):.2f})     | {summary[side]['cpu_median']:6.2f} ({min(cpus):.2f}–"
              f"{max(cpus):.2f})   | {summary[side]['pss_median_mib']:5.0f} ({min(pss):.0f}–"
              f"{max(pss):.0f})             | {summary[side]['accuracy']:.4f}")
    ratio = summary["privet"]["wall_median"] / summary["pfl"]["wall_median"]
    difference = summary["privet"]["accuracy"] - summary["pfl"]["accuracy"]
    loads = [x for ms in runs.values() for m in ms for x in (m.load_before, m.load_after)]
    print(f"privet/pfl (medians of wall time): {ratio:.2f}; of CPU time: "
          f"{summary['privet']['cpu_median'] / summary['pfl']['cpu_median']:.2f}; accuracy "
          f"privet − pfl: "
          f"{difference:+.4f}; 1-minute load average over the runs {min(loads):.2f}–"
          f"{max(loads):.2f} (median {statistics.median(loads):.2f}) on {_cores()} cores")
    summary.update(ratio=ratio, accuracy_difference=difference, cores=_cores(),
                   pfl_threads=threads, pairs=pairs)
    (root / "vs-pfl.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default=",".join(WORKLOADS),
                        help=f"comma-separated workloads out of {', '.join(WORKLOADS)}")
    parser.add_argument("--keep", type=Path, help="write the runs here (default: a temp dir)")
    parser.add_argument("--memory", action="store_true", help="the many-clients memory run")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--vs-pfl", action="store_true",
                        help="privet against pfl-research 0.6 on pfl's best case (digits)")
    parser.add_argument("--pairs", type=int, default=5, help="--vs-pfl: alternated pairs")
    parser.add_argument("--pfl-env", type=Path, default=DEFAULT_PFL_ENV,
                        help="--vs-pfl: pfl's virtualenv (made there when missing)")
    parser.add_argument("--pfl-threads", type=int, default=1,
                        help="--vs-pfl: pfl's torch threads (0 = torch's default)")
    parser.add_argument("--floor", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        result = floor(args.floor)
        args.json.write_text(json.dumps(result))
        return
    if args.memory:
        memory(args.clients, args.rounds, args.keep)
        return
    if args.vs_pfl:
        vs_pfl(args.pairs, args.pfl_env.expanduser(), args.pfl_threads, args.keep)
        return
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        parser.error(f"--only: unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    bench(names, args.repeats, args.keep)


if __name__ == "__main__":
    main()
